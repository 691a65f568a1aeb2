// Framework-free helpers shared by the CUDA kernel headers: conversions to the accumulation type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rlhf_ext {
namespace cuda {

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(float x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t load_as(double x) { return static_cast<acc_t>(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t load_as(__half x) { return static_cast<acc_t>(__half2float(x)); }
template <typename acc_t>
__device__ __forceinline__ acc_t load_as(__nv_bfloat16 x) { return static_cast<acc_t>(__bfloat162float(x)); }

template <typename T>
__device__ __forceinline__ T store_as(float x);
template <>
__device__ __forceinline__ float store_as<float>(float x) { return x; }
template <>
__device__ __forceinline__ double store_as<double>(float x) { return x; }
template <>
__device__ __forceinline__ __half store_as<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Accumulation type: float for float/half/bf16, double for double.
template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

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
