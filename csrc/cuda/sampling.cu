// Torch binding of the fused CUDA sampler (kernels in sampling.cuh). Same checks as the CPU kernel
// (csrc/checks/sampling.cpp); per-row
// setting values are checked by the Python wrapper (reading them here would synchronise), and a row the
// kernel cannot sample comes back as token -1, which the wrapper turns into an error outside graph capture.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "../checks/checks.h"
#include "../kernels.h"
#include "binding.h"
#include "sampling.cuh"

namespace rlhf_ext {

namespace {

template <typename T>
const T* row_ptr(const c10::optional<at::Tensor>& t, at::ScalarType as, at::Tensor& keep_alive) {
  if (!t.has_value()) return nullptr;
  keep_alive = t->to(as).contiguous();
  return keep_alive.data_ptr<T>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cuda(
    const at::Tensor& logits_in, double temperature, int64_t top_k, double top_p, double min_p,
    const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
    const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p,
    c10::optional<at::Generator> generator) {
  check_sample_inputs(logits_in, temperature, top_k, top_p, min_p, row_temperature, row_top_k, row_top_p, row_min_p);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  // Rows may be strided (e.g. logits[:, -1, :] of a [B, T, V] output); only the vocabulary must be contiguous.
  auto logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  auto filtered = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs, filtered};

  at::Tensor t_keep, k_keep, p_keep, m_keep;
  sampling::RowSettings settings{};
  settings.temperature = row_ptr<float>(row_temperature, at::kFloat, t_keep);
  settings.top_k = row_ptr<int64_t>(row_top_k, at::kLong, k_keep);
  settings.top_p = row_ptr<double>(row_top_p, at::kDouble, p_keep);
  settings.min_p = row_ptr<float>(row_min_p, at::kFloat, m_keep);
  settings.temperature_value = static_cast<float>(temperature);
  settings.top_k_value = top_k;
  settings.top_p_value = top_p;
  settings.min_p_value = static_cast<float>(min_p);

  at::PhiloxCudaState philox;
  {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);  // one counter block per call; rows and tokens index the other words
  }
  sampling::PhiloxSeed rng{};
  if (philox.captured_) {
    rng.seed_ptr = philox.seed_.ptr;
    rng.offset_ptr = philox.offset_.ptr;
    rng.offset_intragraph = philox.offset_intragraph_;
  } else {
    rng.seed = philox.seed_.val;
    rng.offset = philox.offset_.val;
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t stride = logits.stride(0);
  const auto launch = [&](const auto* typed_logits) {
    cuda::check_launch(sampling::launch_sample(typed_logits, B, V, stride, settings, rng, tokens.data_ptr<int64_t>(),
                                               logprobs.data_ptr<float>(), filtered.data_ptr<float>(), stream),
                       "sample");
  };
  // The checks admit float32, bfloat16 and float16 only: the kernels exist for those.
  AT_DISPATCH_SWITCH(logits.scalar_type(), "sample_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch(cuda::device_ptr<scalar_t>(logits)); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch(cuda::device_ptr<scalar_t>(logits)); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch(cuda::device_ptr<scalar_t>(logits)); }));
  return {tokens, logprobs, filtered};
}

}  // namespace rlhf_ext
