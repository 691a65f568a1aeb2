// Boundary checks of the logprobs_forward / logprobs_backward / logprobs_backward_inplace ops (CPU and CUDA
// share them).
#include <ATen/MemoryOverlap.h>

#include <cmath>

#include "checks.h"

namespace rlhf_ext {

namespace {

void check_rows_like(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  const auto rows = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(t.sizes() == rows, name, ": expected shape ", at::IntArrayRef(rows), " (logits.shape[:-1]), got ",
              shape_str(t));
  check_same_device(t, logits, name, "logits");
}

}  // namespace

void check_logprobs_forward_inputs(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  check_float(logits, "logits");
  TORCH_CHECK(logits.dim() >= 1, "logits: expected a tensor of shape [..., V], got a 0-d tensor");
  TORCH_CHECK(logits.size(-1) > 0, "logits: expected a non-empty vocabulary dimension (V > 0), got shape ",
              shape_str(logits));
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels: expected an int64 tensor of token ids, got ",
              labels.scalar_type());
  check_rows_like(labels, logits, "labels");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature: expected a finite value > 0, got ",
              temperature);
}

void check_logprobs_backward_inputs(const c10::optional<at::Tensor>& grad_logprobs,
                                    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature) {
  check_logprobs_forward_inputs(logits, labels, temperature);
  if (grad_logprobs.has_value()) {
    check_float(*grad_logprobs, "grad_logprobs");
    check_rows_like(*grad_logprobs, logits, "grad_logprobs");
  }
  if (grad_entropy.has_value()) {
    check_float(*grad_entropy, "grad_entropy");
    check_rows_like(*grad_entropy, logits, "grad_entropy");
  }
  const auto acc = acc_dtype(logits.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc, "lse: expected dtype ", acc, " (from the forward), got ", lse.scalar_type());
  check_rows_like(lse, logits, "lse");
  TORCH_CHECK(entropy.scalar_type() == acc, "entropy: expected dtype ", acc, " (from the forward), got ",
              entropy.scalar_type());
  check_rows_like(entropy, logits, "entropy");
}

void check_logprobs_backward_inplace_inputs(const c10::optional<at::Tensor>& grad_logprobs,
                                            const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                            const at::Tensor& labels, const at::Tensor& lse,
                                            const at::Tensor& entropy, double temperature) {
  check_logprobs_backward_inputs(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature);
  TORCH_CHECK(logits.stride(-1) == 1 || logits.size(-1) == 1,
              "logits: the in-place backward writes the gradient into logits, so its last dim must be contiguous "
              "(stride 1), got strides ",
              logits.strides());
  TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "logits: the in-place backward writes the gradient into logits, so its rows must not share memory "
              "(got an expanded/overlapping tensor); use inplace_backward=False");
}

}  // namespace rlhf_ext
