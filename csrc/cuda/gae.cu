// Thin torch binding for the CUDA GAE kernel (csrc/cuda/gae.cuh); the boundary checks are csrc/checks/gae.cpp.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks/checks.h"
#include "../kernels.h"
#include "binding.h"
#include "gae.cuh"

namespace rlhf_ext {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                            const at::Tensor& mask_in, double gamma, double lam,
                                            const c10::optional<at::Tensor>& last_values_in) {
  const GaeInputs in = prepare_gae_inputs(rewards_in, values_in, mask_in, gamma, lam, last_values_in);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.rewards.scalar_type(), "gae_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc* last_values = in.last_values.defined() ? in.last_values.data_ptr<acc>() : nullptr;
    cuda::check_launch(cuda::launch_gae(cuda::device_ptr<scalar_t>(in.rewards), cuda::device_ptr<scalar_t>(in.values),
                                        in.mask.data_ptr<bool>(), last_values, in.advantages.data_ptr<acc>(),
                                        in.returns.data_ptr<acc>(), in.batch, in.length, gamma, lam, stream),
                       "gae");
  });
  return {in.advantages, in.returns};
}

}  // namespace rlhf_ext
