// Framework-free helpers shared by the CUDA kernel headers: conversions to the accumulation type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

}  // namespace cuda
}  // namespace rlhf_ext
