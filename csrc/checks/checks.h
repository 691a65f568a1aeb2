// Boundary checks and input preparation of every op, shared by the CPU kernels (csrc/cpu/<op>.cpp) and the
// CUDA bindings (csrc/cuda/<op>.cu) so both devices reject the same inputs with the same messages.
// One convention: op <op> declares its checks here, as check_<op>_inputs (or prepare_<op>_inputs where the
// checked inputs also come back made contiguous in one dtype), and defines them in csrc/checks/<op>.cpp.
// Every message names the argument, what was expected and what came, so the user knows which tensor to fix.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "../maths/ppo_loss.h"

namespace rlhf_ext {

// ---- helpers ----

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, name,
              ": expected a float32/bfloat16/float16/float64 tensor, got ", st);
}

inline void check_bool(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBool, name, ": expected a bool tensor, got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", shape_str(ref), " (the shape of ", ref_name,
              "), got ", shape_str(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got one on ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* what) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-d tensor ", what, ", got shape ", shape_str(t));
}

// The torch dtype of maths/acc_type.h's acc_t: float64 for float64 data, float32 otherwise. Outputs,
// statistics and saved tensors (lse, entropy) of every op have it.
inline at::ScalarType acc_dtype(at::ScalarType data_dtype) {
  return data_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- gae (checks/gae.cpp) ----

// rewards, values [B, T] float (same dtype), mask [B, T] bool, gamma and lam in [0, 1], last_values [B] float.
void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                      double lam, const c10::optional<at::Tensor>& last_values);

// Checked inputs, contiguous; last_values in acc_dtype(rewards) (undefined when not given); the two outputs
// advantages and returns allocated as [B, T] of acc_dtype(rewards).
struct GaeInputs {
  at::Tensor rewards, values, mask, last_values, advantages, returns;
  int64_t batch = 0, length = 0;
};
GaeInputs prepare_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                             double gamma, double lam, const c10::optional<at::Tensor>& last_values);

// ---- masked_moments / masked_whiten (checks/whiten.cpp) ----

// x float of any shape, mask bool of x's shape on x's device.
void check_masked_inputs(const at::Tensor& x, const at::Tensor& mask);
// The masked_moments checks, plus eps finite and >= 0.
void check_masked_whiten_inputs(const at::Tensor& x, const at::Tensor& mask, double eps);
// After the moments: the mask must select at least one element (two for the unbiased variance).
void check_whiten_count(double count, bool unbiased);

// ---- logprobs (checks/logprobs.cpp) ----

// logits [..., V] float with V > 0; labels int64 of shape logits.shape[:-1] on the same device; temperature
// finite and > 0.
void check_logprobs_forward_inputs(const at::Tensor& logits, const at::Tensor& labels, double temperature);
// The forward checks, plus: grad_logprobs / grad_entropy (when given), lse and entropy are float tensors of
// shape logits.shape[:-1] on the logits' device, lse and entropy in acc_dtype(logits).
void check_logprobs_backward_inputs(const c10::optional<at::Tensor>& grad_logprobs,
                                    const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature);
// The backward checks, plus: logits can take the gradient in place (unit last stride, no overlapping rows).
void check_logprobs_backward_inplace_inputs(const c10::optional<at::Tensor>& grad_logprobs,
                                            const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                            const at::Tensor& labels, const at::Tensor& lse,
                                            const at::Tensor& entropy, double temperature);
// Logits with a strided last dim are copied once; every other layout is read in place.
inline at::Tensor last_dim_contiguous(const at::Tensor& logits) {
  return logits.stride(-1) == 1 || logits.size(-1) == 1 ? logits : logits.contiguous();
}

// ---- ppo_loss / ppo_loss_backward / kl_penalty (checks/ppo_loss.cpp) ----

// The ppo_loss schema's argument list (csrc/ops.cpp), shared by the forward and backward kernels of both
// devices so the four signatures cannot drift apart.
#define RLHF_PPO_LOSS_PARAMS                                                                                       \
  const at::Tensor &logprobs, const at::Tensor &old_logprobs, const at::Tensor &advantages, const at::Tensor &mask, \
      const std::optional<at::Tensor> &values, const std::optional<at::Tensor> &old_values,                          \
      const std::optional<at::Tensor> &returns, const std::optional<at::Tensor> &ref_logprobs,                       \
      const std::optional<at::Tensor> &entropy, double cliprange, std::optional<double> cliprange_high,              \
      std::optional<double> dual_clip, std::optional<double> cliprange_value, double vf_coef, double kl_coef,       \
      std::string_view kl_estimator, double entropy_coef, std::string_view loss_agg,                                 \
      std::optional<double> loss_agg_norm, double max_log_ratio
#define RLHF_PPO_LOSS_ARGS                                                                                         \
  logprobs, old_logprobs, advantages, mask, values, old_values, returns, ref_logprobs, entropy, cliprange,           \
      cliprange_high, dual_clip, cliprange_value, vf_coef, kl_coef, kl_estimator, entropy_coef, loss_agg,            \
      loss_agg_norm, max_log_ratio

// Validated inputs: contiguous [B, T], all float tensors in one compute dtype (their common dtype, or
// float32 / float64 when they differ), mask bool. Absent optional tensors stay undefined.
struct PpoLossInputs {
  at::Tensor logprobs, old_logprobs, advantages, mask;
  at::Tensor values, old_values, returns, ref_logprobs, entropy;
  ppo::Params params;
  at::ScalarType compute_dtype = at::kFloat;
  int64_t batch = 0, length = 0;
};

PpoLossInputs prepare_ppo_loss_inputs(RLHF_PPO_LOSS_PARAMS);

// grad_out and out of the backward: [kNumOut] vectors of acc_dtype(compute dtype), contiguous.
std::pair<at::Tensor, at::Tensor> prepare_ppo_loss_grad(const at::Tensor& grad_out, const at::Tensor& out,
                                                        const PpoLossInputs& in);

// The backward returns a gradient per differentiable input, in that input's dtype; an empty tensor stands for
// an absent one (values / entropy not given).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cast_ppo_loss_grads(at::Tensor grad_logprobs, at::Tensor grad_values,
                                                                   at::Tensor grad_entropy, RLHF_PPO_LOSS_PARAMS);

int parse_kl_estimator(std::string_view name, const char* arg);

// kl_penalty: returns (logprobs, ref_logprobs) contiguous in one compute dtype.
std::pair<at::Tensor, at::Tensor> prepare_kl_penalty_inputs(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                            double max_log_ratio);

// ---- sample (checks/sampling.cpp) ----

// logits [B, V] float32/bfloat16/float16; the scalar settings in range; each row_* tensor [B] on the logits'
// device (integer for top_k, floating point otherwise). Per-row values are checked by the CPU kernel only
// (reading them on CUDA would synchronise).
void check_sample_inputs(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
                         const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
                         const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p);


// ---- pack_linear_weight / packed_linear (checks/packed_linear.cpp) ----

// The panel width of the packed layout: 16 output features (two AVX2 vectors).
constexpr int64_t kPackedPanel = 16;

// weight [N, K] float32 on the CPU, N and K > 0.
void check_pack_linear_weight_inputs(const at::Tensor& weight);
// input [M, K] float32 on the CPU; packed [ceil(N / 16), K, 16] float32 with N = out_features; bias [N] float32.
void check_packed_linear_inputs(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                                const c10::optional<at::Tensor>& bias);

// ---- decode_step (checks/decode_step.cpp) ----

// hidden [B, H], cos / sin [B, D] (D even), key_cache / value_cache [L, B, KV, C, D] contiguous, final_norm [H]: float32
// on the CPU; key_mask [B, C] bool with True at `slot` in [0, C); num_heads a multiple of KV; weights 6 per layer
// (input norm [H], packed q/k/v [.., H, 16], packed o [.., num_heads * D, 16], post norm [H], packed gate/up
// [.., H, 16], packed down [.., I, 16] with gate/up holding 2 * I outputs); eps >= 0 and scaling finite.
void check_decode_step_inputs(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key_mask,
                              int64_t slot, at::TensorList weights, const at::Tensor& final_norm, int64_t num_heads,
                              double eps, double scaling);

}  // namespace rlhf_ext
