// The one place where rlhf_ext's operator schemas are declared. Each device binds every op to its kernel in one
// table: csrc/cpu/register.cpp (CPU) and csrc/cuda/register.cu (CUDA), the kernels' types being csrc/kernels.h.
// A new op needs a schema here, its type and declaration there and a line in both tables. Backward kernels are
// ops of their own.
// The pybind11 module carries the build facts (rlhf_ext._C.build_info()).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifndef RLHF_EXT_TORCH_VERSION
#define RLHF_EXT_TORCH_VERSION "unknown"
#endif
#ifndef RLHF_EXT_CUDA_ARCHS
#define RLHF_EXT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(rlhf_ext, m) {
  // ---- advantages (csrc/cpu/gae.cpp, csrc/cuda/gae.cu) ----
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam, Tensor? last_values) -> (Tensor, Tensor)");

  // ---- masked statistics (csrc/cpu/whiten.cpp, csrc/cuda/whiten.cu) ----
  // Returns float32 [3]: (count, mean, M2) where M2 = sum over masked-in x of (x - mean)^2.
  m.def("masked_moments(Tensor x, Tensor mask) -> Tensor");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");

  // ---- logprobs (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu) ----
  // logits [..., V] (last dim contiguous), labels [...] int64. Returns (logprobs, entropy, lse), each [...]
  // float32 (float64 for float64 logits): log_softmax(logits / T)[label], its entropy (zeros unless
  // with_entropy) and logsumexp(logits / T). Rows whose label == ignore_index give 0 everywhere.
  // inplace_backward is not read by the kernels: it tells the autograd formula to write the gradient
  // into the logits buffer (logprobs_backward_inplace) instead of a new tensor.
  m.def("logprobs_forward(Tensor logits, Tensor labels, float temperature, int ignore_index, bool with_entropy, bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  // dlogits = (g * onehot(label) - p * (g + h * (log p + H))) / T, p = softmax(logits / T), in the logits' dtype;
  // g = grad_logprobs, h = grad_entropy (a missing one counts as 0); ignore_index rows get 0.
  m.def("logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  // Same, written over `logits` (which must not be needed afterwards).
  m.def("logprobs_backward_inplace(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor(a!) logits, Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> ()");


  // ---- ppo_loss (csrc/cpu/ppo_loss.cpp, csrc/cuda/ppo_loss.cu) ----
  // Returns one float32 vector (float64 for float64 inputs) of length 16, laid out as
  // csrc/maths/ppo_loss.h `Out`: loss, policy_loss, value_loss, kl, entropy, clipfrac, clipfrac_low,
  // clipfrac_high, dual_clipfrac, approxkl, approxkl_k3, ratio_mean, ratio_max, value_clipfrac,
  // num_tokens, num_seqs. rlhf_ext/ops/ppo_loss.py names them; nothing leaves the device.
  m.def("ppo_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor? values, "
        "Tensor? old_values, Tensor? returns, Tensor? ref_logprobs, Tensor? entropy, float cliprange, "
        "float? cliprange_high, float? dual_clip, float? cliprange_value, float vf_coef, float kl_coef, "
        "str kl_estimator, float entropy_coef, str loss_agg, float? loss_agg_norm, float max_log_ratio) -> Tensor");
  // Gradients wrt (logprobs, values, entropy) in one pass, each in its input's dtype; an absent
  // values/entropy gives an empty tensor. grad_out/out: the forward output's gradient and value.
  m.def("ppo_loss_backward(Tensor grad_out, Tensor out, Tensor logprobs, Tensor old_logprobs, Tensor advantages, "
        "Tensor mask, Tensor? values, Tensor? old_values, Tensor? returns, Tensor? ref_logprobs, Tensor? entropy, "
        "float cliprange, float? cliprange_high, float? dual_clip, float? cliprange_value, float vf_coef, "
        "float kl_coef, str kl_estimator, float entropy_coef, str loss_agg, float? loss_agg_norm, "
        "float max_log_ratio) -> (Tensor, Tensor, Tensor)");
  // Per-token KL estimate (k1 | k2 | k3) for reward shaping; float32 (float64 for float64 inputs).
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, str estimator, float max_log_ratio) -> Tensor");


  // ---- sampling (csrc/cpu/sampling.cpp, csrc/cuda/sampling.cu) ----
  // Returns (tokens int64 [B], logprobs float32 [B] under the unfiltered tempered distribution, filtered_logprobs
  // float32 [B] under the renormalised top-k/top-p/min-p distribution). Each row_* tensor [B], when given, replaces
  // the scalar beside it for its row. temperature 0 = greedy; top_k 0, top_p 1, min_p 0 = off.
  m.def("sample(Tensor logits, float temperature, int top_k, float top_p, float min_p, Tensor? row_temperature, "
        "Tensor? row_top_k, Tensor? row_top_p, Tensor? row_min_p, Generator? generator) -> (Tensor, Tensor, Tensor)");

  // ---- packed_linear (csrc/cpu/packed_linear.cpp; CPU only: CUDA decodes through cuBLAS) ----
  // A linear layer's weight [N, K] float32 repacked as [ceil(N / 16), K, 16] (panels of 16 output features,
  // k-major, the last panel zero-padded), packed once and read by every product while the weight stays fixed.
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  // input [M, K] float32 @ weight^T (+ bias [N]) -> [M, N] float32, the weight given packed; for few rows (a decode
  // step: M = batch) where a BLAS splits the work poorly. Each output is one k-ordered sum, whatever the threads.
  m.def("packed_linear(Tensor input, Tensor packed, int out_features, Tensor? bias) -> Tensor");

  // ---- decode_step (csrc/cpu/decode_step.cpp; CPU only: CUDA replays the eager step from a CUDA graph) ----
  // One KV-cached decode step of a Llama-style stack: hidden [B, H] (the token embeddings) through the layers whose
  // weights come 6 per layer (checks.h), rotary cos / sin [B, D], writing each layer's key / value at cache slot
  // `slot` and attending to the slots 0 .. slot that key_mask marks; returns the final-normed hidden states [B, H].
  m.def("decode_step(Tensor hidden, Tensor cos, Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor key_mask, int slot, Tensor[] weights, Tensor final_norm, int num_heads, float eps, float scaling) "
        "-> Tensor");

}

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = RLHF_EXT_TORCH_VERSION;
#ifdef RLHF_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = RLHF_EXT_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  info["num_threads"] = at::get_num_threads();
  info["parallel_backend"] = at::get_parallel_info();
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_ext compiled core: operator kernels are registered under torch.ops.rlhf_ext";
  m.def("build_info", &build_info, "Facts about how this extension was built");
}
