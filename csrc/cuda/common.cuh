// Framework-free helpers shared by the CUDA kernel headers: the accumulation type (csrc/maths/acc_type.h), the one
// set of conversions between storage and accumulation types, and row addressing of [..., V] tensors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../maths/acc_type.h"

namespace rlhf_ext {
namespace cuda {

// Storage -> accumulation type (acc_t: float for float/half/bfloat16, double for double). Exact.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Accumulation -> storage type, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

// Where row r of a [..., V] tensor with unit last stride starts, in elements, for ANY leading layout
// (no copy): up to kMaxRowLevels (size, stride) levels, innermost first, after size-1 dims are dropped
// and dims contiguous over each other merged (contiguous rows: one level {rows, V}, a multiply); a
// layout with more levels passes a device table of per-row offsets instead.
constexpr int kMaxRowLevels = 6;
struct RowLayout {
  int levels = 1;
  int64_t sizes[kMaxRowLevels] = {1};
  int64_t strides[kMaxRowLevels] = {0};
  const int64_t* table = nullptr;  // [rows] offsets; when set, the levels are not used
  __host__ __device__ int64_t offset(int64_t r) const {
    if (table != nullptr) return table[r];
    int64_t off = 0;
#pragma unroll
    for (int d = 0; d < kMaxRowLevels; ++d) {  // constant indices: the params stay in registers
      if (d + 1 >= levels) return off + r * strides[d];  // the outermost level needs no modulo
      off += (r % sizes[d]) * strides[d];
      r /= sizes[d];
    }
    return off;
  }
};

// Fills `out` from the leading dims of a [..., V] tensor, outermost first as torch lists them; false
// (and `out` unusable) when they need more than kMaxRowLevels levels: pass a table then.
inline bool make_row_layout(int lead_dims, const int64_t* sizes, const int64_t* strides, RowLayout& out) {
  out = RowLayout{};
  int n = 0;
  for (int d = lead_dims - 1; d >= 0; --d) {
    if (sizes[d] == 1) continue;
    if (n > 0 && strides[d] == out.strides[n - 1] * out.sizes[n - 1]) {
      out.sizes[n - 1] *= sizes[d];
      continue;
    }
    if (n == kMaxRowLevels) return false;
    out.sizes[n] = sizes[d];
    out.strides[n] = strides[d];
    ++n;
  }
  out.levels = n > 0 ? n : 1;
  return true;
}

}  // namespace cuda
}  // namespace rlhf_ext
