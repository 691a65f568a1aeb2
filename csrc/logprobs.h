// Boundary checks for the logprobs ops, shared by the CPU kernels (csrc/logprobs.cpp) and the CUDA
// binding (csrc/cuda/logprobs.cu) so both devices reject the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace rlhf_ext {

// logits [..., V] float32/bfloat16/float16/float64 with V > 0; labels int64 of shape logits.shape[:-1]
// on the same device; temperature finite and > 0.
void check_logprobs_forward_inputs(const at::Tensor& logits, const at::Tensor& labels, double temperature);

// The forward checks, plus: grad_logprobs / grad_entropy (when given), lse and entropy are float
// tensors of shape logits.shape[:-1] on the logits' device.
void check_logprobs_backward_inputs(const c10::optional<at::Tensor>& grad_logprobs,
                                    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature);

// float64 for float64 logits, float32 otherwise: the dtype of log-probs, entropy and lse.
inline at::ScalarType logprobs_acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace rlhf_ext
