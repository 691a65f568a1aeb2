// Thin torch binding for the CUDA masked moments / whitening kernels (csrc/cuda/whiten.cuh).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"
#include "whiten.cuh"

namespace rlhf_ext {
namespace {

template <typename scalar_t>
using device_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half,
                                    std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16, scalar_t>>;

at::Tensor moments_cuda(const at::Tensor& x, const at::Tensor& mask) {
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({3}, x.options().dtype(stat_dtype));
  auto partials = at::empty({3 * cuda::moments_num_segments(x.numel())}, x.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_moments_cuda", [&] {
    using dev_t = device_t<scalar_t>;
    using stat_t = typename cuda::AccType<dev_t>::type;
    const cudaError_t err = cuda::launch_masked_moments<dev_t, stat_t>(
        reinterpret_cast<const dev_t*>(x.data_ptr<scalar_t>()), mask.data_ptr<bool>(), x.numel(),
        partials.data_ptr<double>(), out.data_ptr<stat_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, "masked_moments: CUDA launch failed: ", cudaGetErrorString(err));
  });
  return out;
}

at::Tensor masked_moments_cuda(const at::Tensor& x_in, const at::Tensor& mask_in) {
  check_masked_inputs(x_in, mask_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  return moments_cuda(x_in.contiguous(), mask_in.contiguous());
}

at::Tensor masked_whiten_cuda(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean, bool unbiased,
                              double eps) {
  check_masked_inputs(x_in, mask_in);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto mask = mask_in.contiguous();
  auto moments = moments_cuda(x, mask);
  // One host sync to refuse an empty mask with a clear error: whitening runs once per step, off
  // the per-token hot path, and NaN advantages would silently ruin training.
  const double count = moments[0].item<double>();
  TORCH_CHECK(count > 0, "mask: selects no element (mask.sum() == 0); masked statistics are undefined");
  TORCH_CHECK(!unbiased || count > 1,
              "mask: selects a single element, so the unbiased variance is undefined; pass unbiased=False");
  auto out = at::empty(x.sizes(), x.options().dtype(moments.scalar_type()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_whiten_cuda", [&] {
    using dev_t = device_t<scalar_t>;
    using stat_t = typename cuda::AccType<dev_t>::type;
    const cudaError_t err = cuda::launch_masked_whiten<dev_t, stat_t>(
        reinterpret_cast<const dev_t*>(x.data_ptr<scalar_t>()), mask.data_ptr<bool>(), moments.data_ptr<stat_t>(),
        x.numel(), shift_mean, unbiased, eps, out.data_ptr<stat_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, "masked_whiten: CUDA launch failed: ", cudaGetErrorString(err));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("masked_moments", &masked_moments_cuda);
  m.impl("masked_whiten", &masked_whiten_cuda);
}

}  // namespace rlhf_ext
