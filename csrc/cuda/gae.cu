// Thin torch binding for the CUDA GAE kernel (csrc/cuda/gae.cuh).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "gae.cuh"

namespace rlhf_ext {
namespace {

template <typename scalar_t>
using device_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
                                    std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                            const at::Tensor& mask_in, double gamma, double lam,
                                            const c10::optional<at::Tensor>& last_values_in) {
  check_gae_inputs(rewards_in, values_in, mask_in, gamma, lam, last_values_in);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  auto rewards = rewards_in.contiguous();
  auto values = values_in.contiguous();
  auto mask = mask_in.contiguous();
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto advantages = at::empty({B, T}, rewards.options().dtype(out_dtype));
  auto returns = at::empty({B, T}, rewards.options().dtype(out_dtype));
  at::Tensor last_values;
  if (last_values_in.has_value()) last_values = last_values_in->to(out_dtype).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_cuda", [&] {
    using dev_t = device_t<scalar_t>;
    using acc_t = typename cuda::AccType<dev_t>::type;
    const cudaError_t err = cuda::launch_gae<dev_t, acc_t>(
        reinterpret_cast<const dev_t*>(rewards.data_ptr<scalar_t>()),
        reinterpret_cast<const dev_t*>(values.data_ptr<scalar_t>()), mask.data_ptr<bool>(),
        last_values.defined() ? last_values.data_ptr<acc_t>() : nullptr, advantages.data_ptr<acc_t>(),
        returns.data_ptr<acc_t>(), B, T, gamma, lam, stream);
    TORCH_CHECK(err == cudaSuccess, "gae: CUDA launch failed: ", cudaGetErrorString(err));
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) { m.impl("gae", &gae_cuda); }

}  // namespace rlhf_ext
