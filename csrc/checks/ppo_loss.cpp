// Boundary checks of the ppo_loss / ppo_loss_backward / kl_penalty ops (CPU and CUDA share them).
// Every message names the argument, what was expected and what came.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"

namespace rlhf_ext {

namespace {

// exp(80) ~ 5.5e34 still fits in float32 (exp(89) does not), with room for the ratio products.
constexpr double kMaxLogRatioLimit = 80.0;

void check_token_tensor(const at::Tensor& t, const at::Tensor& logprobs, const char* name) {
  check_float(t, name);
  check_same_shape(t, logprobs, name, "logprobs");
  check_same_device(t, logprobs, name, "logprobs");
}

void check_finite(double x, const char* name) {
  TORCH_CHECK(std::isfinite(x), name, ": expected a finite number, got ", x);
}

int parse_loss_agg(std::string_view name) {
  if (name == "token-mean") return ppo::kTokenMean;
  if (name == "seq-mean-token-mean") return ppo::kSeqMeanTokenMean;
  if (name == "seq-mean-token-sum") return ppo::kSeqMeanTokenSum;
  if (name == "seq-mean-token-sum-norm") return ppo::kSeqMeanTokenSumNorm;
  TORCH_CHECK(false, "loss_agg: expected one of 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum', "
              "'seq-mean-token-sum-norm', got '", std::string(name), "'");
  return -1;
}

// All float inputs share one compute dtype so the kernels are instantiated once per dtype: their
// common dtype when they agree, else float64 if one is float64, else float32.
at::ScalarType common_compute_dtype(const std::vector<at::Tensor>& tensors) {
  const at::ScalarType first = tensors.front().scalar_type();
  bool same = true, any_double = false;
  for (const auto& t : tensors) {
    same = same && t.scalar_type() == first;
    any_double = any_double || t.scalar_type() == at::kDouble;
  }
  if (same) return first;
  return any_double ? at::kDouble : at::kFloat;
}

at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() ? t.to(dtype).contiguous() : t;
}

}  // namespace

int parse_kl_estimator(std::string_view name, const char* arg) {
  if (name == "k1") return ppo::kK1;
  if (name == "k2") return ppo::kK2;
  if (name == "k3") return ppo::kK3;
  TORCH_CHECK(false, arg, ": expected one of 'k1', 'k2', 'k3', got '", std::string(name), "'");
  return -1;
}

PpoLossInputs prepare_ppo_loss_inputs(RLHF_PPO_LOSS_PARAMS) {
  check_dim(logprobs, 2, "logprobs", "[B, T]");
  check_float(logprobs, "logprobs");
  check_token_tensor(old_logprobs, logprobs, "old_logprobs");
  check_token_tensor(advantages, logprobs, "advantages");
  check_same_shape(mask, logprobs, "mask", "logprobs");
  check_same_device(mask, logprobs, "mask", "logprobs");
  check_bool(mask, "mask");

  const bool has_values = values.has_value();
  TORCH_CHECK(!has_values || (old_values.has_value() && returns.has_value()), "values: given without ",
              old_values.has_value() ? "returns" : "old_values",
              "; the clipped value loss needs values, old_values and returns together");
  TORCH_CHECK(has_values || (!old_values.has_value() && !returns.has_value()),
              old_values.has_value() ? "old_values" : "returns",
              ": given without values; pass values (the critic's predictions) too, or neither");
  if (has_values) {
    check_token_tensor(*values, logprobs, "values");
    check_token_tensor(*old_values, logprobs, "old_values");
    check_token_tensor(*returns, logprobs, "returns");
  }
  if (ref_logprobs.has_value()) check_token_tensor(*ref_logprobs, logprobs, "ref_logprobs");
  if (entropy.has_value()) check_token_tensor(*entropy, logprobs, "entropy");

  TORCH_CHECK(std::isfinite(cliprange) && cliprange >= 0 && cliprange < 1,
              "cliprange: expected a value in [0, 1), got ", cliprange);
  const double clip_high = cliprange_high.value_or(cliprange);
  TORCH_CHECK(std::isfinite(clip_high) && clip_high >= 0, "cliprange_high: expected a finite value >= 0, got ",
              clip_high);
  if (dual_clip.has_value()) {
    TORCH_CHECK(std::isfinite(*dual_clip) && *dual_clip > 1,
                "dual_clip: expected a finite value > 1 (the cap on -A * ratio for A < 0) or None, got ", *dual_clip);
  }
  if (cliprange_value.has_value()) {
    TORCH_CHECK(std::isfinite(*cliprange_value) && *cliprange_value >= 0,
                "cliprange_value: expected a finite value >= 0 or None (no value clipping), got ", *cliprange_value);
  }
  check_finite(vf_coef, "vf_coef");
  check_finite(kl_coef, "kl_coef");
  check_finite(entropy_coef, "entropy_coef");
  const int kl_est = parse_kl_estimator(kl_estimator, "kl_estimator");
  TORCH_CHECK(kl_coef == 0 || ref_logprobs.has_value(), "kl_coef: is ", kl_coef,
              " but ref_logprobs is None; the KL term needs the reference policy's log-probs");
  TORCH_CHECK(entropy_coef == 0 || entropy.has_value(), "entropy_coef: is ", entropy_coef,
              " but entropy is None; the entropy bonus needs the per-token entropy");
  const int agg = parse_loss_agg(loss_agg);
  if (loss_agg_norm.has_value()) {
    TORCH_CHECK(agg == ppo::kSeqMeanTokenSumNorm, "loss_agg_norm: only used with loss_agg='seq-mean-token-sum-norm', "
                "got loss_agg='", std::string(loss_agg), "' and loss_agg_norm=", *loss_agg_norm, "; pass None");
    TORCH_CHECK(std::isfinite(*loss_agg_norm) && *loss_agg_norm > 0, "loss_agg_norm: expected a finite value > 0, got ",
                *loss_agg_norm);
  }
  TORCH_CHECK(std::isfinite(max_log_ratio) && max_log_ratio > 0 && max_log_ratio <= kMaxLogRatioLimit,
              "max_log_ratio: expected a value in (0, ", kMaxLogRatioLimit, "] (exp must not overflow float32), got ",
              max_log_ratio);

  PpoLossInputs in;
  std::vector<at::Tensor> floats = {logprobs, old_logprobs, advantages};
  for (const auto* t : {&values, &old_values, &returns, &ref_logprobs, &entropy}) {
    if (t->has_value()) floats.push_back(**t);
  }
  in.compute_dtype = common_compute_dtype(floats);
  const auto dt = in.compute_dtype;
  in.logprobs = prepared(logprobs, dt);
  in.old_logprobs = prepared(old_logprobs, dt);
  in.advantages = prepared(advantages, dt);
  in.mask = mask.contiguous();
  in.values = prepared(values.value_or(at::Tensor()), dt);
  in.old_values = prepared(old_values.value_or(at::Tensor()), dt);
  in.returns = prepared(returns.value_or(at::Tensor()), dt);
  in.ref_logprobs = prepared(ref_logprobs.value_or(at::Tensor()), dt);
  in.entropy = prepared(entropy.value_or(at::Tensor()), dt);
  in.batch = logprobs.size(0);
  in.length = logprobs.size(1);

  ppo::Params& p = in.params;
  p.ratio_low = 1.0 - cliprange;
  p.ratio_high = 1.0 + clip_high;
  p.dual_clip = dual_clip.value_or(0.0);
  p.cliprange_value = cliprange_value.value_or(-1.0);
  p.vf_coef = vf_coef;
  p.kl_coef = kl_coef;
  p.entropy_coef = entropy_coef;
  p.loss_agg_norm = loss_agg_norm.value_or(static_cast<double>(in.length));
  p.max_log_ratio = max_log_ratio;
  p.kl_estimator = ref_logprobs.has_value() ? kl_est : ppo::kNoKl;
  p.loss_agg = agg;
  return in;
}

std::pair<at::Tensor, at::Tensor> prepare_ppo_loss_grad(const at::Tensor& grad_out, const at::Tensor& out,
                                                        const PpoLossInputs& in) {
  const auto out_dtype = acc_dtype(in.compute_dtype);
  for (const auto* t : {&grad_out, &out}) {
    const char* name = t == &grad_out ? "grad_out" : "out";
    TORCH_CHECK(t->dim() == 1 && t->size(0) == ppo::kNumOut, name, ": expected shape [", int(ppo::kNumOut),
                "] (the ppo_loss output vector), got ", shape_str(*t));
    check_same_device(*t, in.logprobs, name, "logprobs");
  }
  return {grad_out.to(out_dtype).contiguous(), out.to(out_dtype).contiguous()};
}

namespace {

// grad (computed in the compute dtype) as `dtype`: finite values beyond dtype's range saturate at its
// largest finite value instead of overflowing to inf, as the kernels do when they store in the input dtype.
at::Tensor saturating_cast(const at::Tensor& grad, at::ScalarType dtype) {
  if (grad.scalar_type() == dtype) return grad;
  double max_finite = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "saturating_cast", [&] {
    max_finite = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return at::where(grad.isinf(), grad, grad.clamp(-max_finite, max_finite)).to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cast_ppo_loss_grads(at::Tensor grad_logprobs, at::Tensor grad_values,
                                                                   at::Tensor grad_entropy, RLHF_PPO_LOSS_PARAMS) {
  auto absent = at::empty({0}, logprobs.options());
  return {saturating_cast(grad_logprobs, logprobs.scalar_type()),
          grad_values.defined() ? saturating_cast(grad_values, values->scalar_type()) : absent,
          grad_entropy.defined() ? saturating_cast(grad_entropy, entropy->scalar_type()) : absent};
}

std::pair<at::Tensor, at::Tensor> prepare_kl_penalty_inputs(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                            double max_log_ratio) {
  check_float(logprobs, "logprobs");
  check_token_tensor(ref_logprobs, logprobs, "ref_logprobs");
  TORCH_CHECK(std::isfinite(max_log_ratio) && max_log_ratio > 0 && max_log_ratio <= kMaxLogRatioLimit,
              "max_log_ratio: expected a value in (0, ", kMaxLogRatioLimit, "] (exp must not overflow float32), got ",
              max_log_ratio);
  const auto dt = common_compute_dtype({logprobs, ref_logprobs});
  return {logprobs.to(dt).contiguous(), ref_logprobs.to(dt).contiguous()};
}

}  // namespace rlhf_ext
