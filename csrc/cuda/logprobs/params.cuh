// gather_logprobs on CUDA, part 1 of 3: launch constants, the launchers' parameter blocks and the device helpers
// the forward (csrc/cuda/logprobs/forward.cuh) and backward (csrc/cuda/logprobs/backward.cuh) kernels share.
// Framework-free; the maths and the bit-reproducibility rules are at the top of csrc/cuda/logprobs.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common.cuh"

namespace rlhf_ext::cuda::logprobs {

using cuda::from_acc;
using cuda::RowLayout;
using cuda::to_acc;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                // 16-byte loads in flight per thread
constexpr int64_t kMaxRows = 2147483647;  // rows go on grid.x
constexpr int64_t kPacksPerSplit = 2048;  // 16-byte groups (32 KiB of row) per forward split
constexpr int kMaxSplits = 64;

template <typename T>
struct ForwardParams {
  const T* logits;
  RowLayout layout;
  int64_t rows, vocab;
  const int64_t* labels;   // [rows]
  acc_t<T>* logprobs;      // [rows]
  acc_t<T>* entropy;       // [rows], 0 unless with_entropy
  acc_t<T>* lse;           // [rows]
  acc_t<T> inv_temperature;
  int64_t ignore_index;
  bool with_entropy;
};

template <typename T>
struct BackwardParams {
  const T* logits;
  RowLayout in_layout;
  T* grad;  // may equal logits (in-place), with the same layout
  RowLayout out_layout;
  int64_t rows, vocab;
  const int64_t* labels;
  const acc_t<T>* grad_logprobs;  // [rows] or nullptr
  const acc_t<T>* grad_entropy;   // [rows] or nullptr
  const acc_t<T>* lse;
  const acc_t<T>* entropy;
  acc_t<T> inv_temperature;
  int64_t ignore_index;
};

namespace detail {

template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// Per accumulation type: the running-max start (finite, so lowest - lowest = 0) and the clamp below
// which exp is exactly 0 (float underflows below -103.3, double below -745.2).
template <typename A>
struct Lim;
template <>
struct Lim<float> {
  static constexpr float kLowest = -3.402823466e+38f, kClampLow = -200.f;
};
template <>
struct Lim<double> {
  static constexpr double kLowest = -1.7976931348623157e+308, kClampLow = -800.0;
};

// max(d, kClampLow) that keeps NaN (fmax would return the clamp for a NaN d).
template <typename A>
__device__ __forceinline__ A clamp_low(A d) { return d < Lim<A>::kClampLow ? Lim<A>::kClampLow : d; }
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// Group g of a row (elements [g * kVec, (g + 1) * kVec)): one 16-byte load when the row is aligned.
template <typename T, bool kAligned>
__device__ __forceinline__ Pack<T> load_group(const T* z, int64_t g) {
  if constexpr (kAligned) {
    return reinterpret_cast<const Pack<T>*>(z)[g];
  } else {
    Pack<T> out;
#pragma unroll
    for (int k = 0; k < Pack<T>::kVec; ++k) out.v[k] = z[g * Pack<T>::kVec + k];
    return out;
  }
}

}  // namespace detail

}  // namespace rlhf_ext::cuda::logprobs
