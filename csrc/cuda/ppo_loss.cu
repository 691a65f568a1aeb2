// Torch binding of the CUDA ppo_loss / ppo_loss_backward / kl_penalty kernels (csrc/cuda/ppo_loss.cuh).
// The boundary checks are csrc/checks/ppo_loss.cpp; launches go on the current stream.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers

#include "../checks/checks.h"
#include "../kernels.h"
#include "binding.h"
#include "ppo_loss.cuh"

namespace rlhf_ext {

namespace {

using cuda::device_ptr;
using cuda::mutable_device_ptr;

template <typename scalar_t>
ppo_cuda::TokenArgs<cuda::device_t<scalar_t>> token_args(const PpoLossInputs& in) {
  return {device_ptr<scalar_t>(in.logprobs), device_ptr<scalar_t>(in.old_logprobs), device_ptr<scalar_t>(in.advantages),
          device_ptr<scalar_t>(in.ref_logprobs), device_ptr<scalar_t>(in.values), device_ptr<scalar_t>(in.old_values),
          device_ptr<scalar_t>(in.returns), device_ptr<scalar_t>(in.entropy), in.mask.data_ptr<bool>(),
          in.batch, in.length};
}

}  // namespace

at::Tensor ppo_loss_cuda(RLHF_PPO_LOSS_PARAMS) {
  const PpoLossInputs in = prepare_ppo_loss_inputs(RLHF_PPO_LOSS_ARGS);
  const c10::cuda::CUDAGuard guard(in.logprobs.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto options = in.logprobs.options();
  auto workspace = at::empty({ppo_cuda::forward_blocks(in.batch) * ppo::kNumPart}, options.dtype(at::kDouble));
  auto out = at::empty({ppo::kNumOut}, options.dtype(acc_dtype(in.compute_dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.compute_dtype, "ppo_loss_cuda", [&] {
    cuda::check_launch(ppo_cuda::launch_ppo_loss_forward(token_args<scalar_t>(in), in.params,
                                                         workspace.data_ptr<double>(),
                                                         out.data_ptr<acc_t<scalar_t>>(), stream),
                       "ppo_loss");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss_backward_cuda(const at::Tensor& grad_out_in,
                                                                      const at::Tensor& out_in, RLHF_PPO_LOSS_PARAMS) {
  const PpoLossInputs in = prepare_ppo_loss_inputs(RLHF_PPO_LOSS_ARGS);
  // Not a structured binding: lambdas capture those only from C++20 on.
  const auto grad_and_out = prepare_ppo_loss_grad(grad_out_in, out_in, in);
  const at::Tensor& grad_out = grad_and_out.first;
  const at::Tensor& out = grad_and_out.second;
  const c10::cuda::CUDAGuard guard(in.logprobs.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = in.batch, T = in.length;
  auto grad_lp = at::empty({B, T}, in.logprobs.options());
  auto grad_v = in.values.defined() ? at::empty({B, T}, in.values.options()) : at::Tensor();
  auto grad_ent = in.entropy.defined() ? at::empty({B, T}, in.entropy.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.compute_dtype, "ppo_loss_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::check_launch(ppo_cuda::launch_ppo_loss_backward(token_args<scalar_t>(in), in.params,
                                                          grad_out.data_ptr<acc>(), out.data_ptr<acc>(),
                                                          mutable_device_ptr<scalar_t>(grad_lp),
                                                          mutable_device_ptr<scalar_t>(grad_v),
                                                          mutable_device_ptr<scalar_t>(grad_ent), stream),
                       "ppo_loss_backward");
  });
  return cast_ppo_loss_grads(grad_lp, grad_v, grad_ent, RLHF_PPO_LOSS_ARGS);
}

at::Tensor kl_penalty_cuda(const at::Tensor& logprobs_in, const at::Tensor& ref_in, std::string_view estimator,
                           double max_log_ratio) {
  const int kl_estimator = parse_kl_estimator(estimator, "estimator");
  const auto inputs = prepare_kl_penalty_inputs(logprobs_in, ref_in, max_log_ratio);
  const at::Tensor& logprobs = inputs.first;
  const at::Tensor& ref_logprobs = inputs.second;
  const c10::cuda::CUDAGuard guard(logprobs.device());
  auto out = at::empty(logprobs.sizes(), logprobs.options().dtype(acc_dtype(logprobs.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "kl_penalty_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::check_launch(ppo_cuda::launch_kl_penalty(device_ptr<scalar_t>(logprobs), device_ptr<scalar_t>(ref_logprobs),
                                                   logprobs.numel(), kl_estimator, static_cast<acc>(max_log_ratio),
                                                   out.data_ptr<acc>(), c10::cuda::getCurrentCUDAStream()),
                       "kl_penalty");
  });
  return out;
}

}  // namespace rlhf_ext
