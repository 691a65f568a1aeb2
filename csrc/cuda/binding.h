// Torch-side helpers of the thin CUDA bindings (csrc/cuda/<op>.cu): the one mapping from torch's element types
// to the CUDA ones the framework-free kernels (csrc/cuda/<op>.cuh) take, typed device pointers, and the check of
// a launcher's cudaError_t. Not for the .cuh headers, which include nothing from torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace rlhf_ext::cuda {

// at::Half -> __half, at::BFloat16 -> __nv_bfloat16, float and double unchanged (same size and bits).
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<c10::Half> {
  using type = __half;
};
template <>
struct DeviceType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using device_t = typename DeviceType<scalar_t>::type;

// t's data as the kernels' element type; nullptr for an undefined (absent optional) tensor.
template <typename scalar_t>
const device_t<scalar_t>* device_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const device_t<scalar_t>*>(t.const_data_ptr<scalar_t>()) : nullptr;
}
template <typename scalar_t>
device_t<scalar_t>* mutable_device_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<device_t<scalar_t>*>(t.data_ptr<scalar_t>()) : nullptr;
}

// Every launcher returns cudaGetLastError() (or cudaErrorInvalidValue for sizes it cannot launch).
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace rlhf_ext::cuda
