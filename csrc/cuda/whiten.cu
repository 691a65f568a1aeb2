// Thin torch binding for the CUDA masked moments / whitening kernels (csrc/cuda/whiten.cuh); the boundary checks
// are csrc/checks/whiten.cpp.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks/checks.h"
#include "../kernels.h"
#include "binding.h"
#include "whiten.cuh"

namespace rlhf_ext {
namespace {

at::Tensor moments_cuda(const at::Tensor& x, const at::Tensor& mask) {
  auto out = at::empty({3}, x.options().dtype(acc_dtype(x.scalar_type())));
  auto partials = at::empty({3 * cuda::moments_num_segments(x.numel())}, x.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_moments_cuda", [&] {
    cuda::check_launch(cuda::launch_masked_moments(cuda::device_ptr<scalar_t>(x), mask.data_ptr<bool>(), x.numel(),
                                                   partials.data_ptr<double>(), out.data_ptr<acc_t<scalar_t>>(),
                                                   stream),
                       "masked_moments");
  });
  return out;
}

}  // namespace

at::Tensor masked_moments_cuda(const at::Tensor& x_in, const at::Tensor& mask_in) {
  check_masked_inputs(x_in, mask_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  return moments_cuda(x_in.contiguous(), mask_in.contiguous());
}

at::Tensor masked_whiten_cuda(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean, bool unbiased,
                              double eps) {
  check_masked_whiten_inputs(x_in, mask_in, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto mask = mask_in.contiguous();
  auto moments = moments_cuda(x, mask);
  // One host sync to refuse an empty mask with a clear error: whitening runs once per step, off
  // the per-token hot path, and NaN advantages would silently ruin training.
  check_whiten_count(moments[0].item<double>(), unbiased);
  auto out = at::empty(x.sizes(), x.options().dtype(moments.scalar_type()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_whiten_cuda", [&] {
    using acc = acc_t<scalar_t>;
    cuda::check_launch(cuda::launch_masked_whiten(cuda::device_ptr<scalar_t>(x), mask.data_ptr<bool>(),
                                                  moments.data_ptr<acc>(), x.numel(), shift_mean, unbiased, eps,
                                                  out.data_ptr<acc>(), stream),
                       "masked_whiten");
  });
  return out;
}

}  // namespace rlhf_ext
