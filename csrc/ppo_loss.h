// Boundary checks and input preparation of the ppo_loss / kl_penalty ops, shared by the CPU kernels
// (csrc/ppo_loss.cpp, which defines these functions) and the CUDA binding (csrc/cuda/ppo_loss.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>

#include "common.h"
#include "ppo_loss_math.h"

// The ppo_loss schema's argument list (csrc/ops.cpp), shared by the forward and backward kernels of
// both devices so the four signatures cannot drift apart.
#define RLHF_PPO_LOSS_PARAMS                                                                             \
  const at::Tensor &logprobs, const at::Tensor &old_logprobs, const at::Tensor &advantages,              \
      const at::Tensor &mask, const std::optional<at::Tensor> &values,                                   \
      const std::optional<at::Tensor> &old_values, const std::optional<at::Tensor> &returns,             \
      const std::optional<at::Tensor> &ref_logprobs, const std::optional<at::Tensor> &entropy,           \
      double cliprange, std::optional<double> cliprange_high, std::optional<double> dual_clip,           \
      std::optional<double> cliprange_value, double vf_coef, double kl_coef,                             \
      std::string_view kl_estimator, double entropy_coef, std::string_view loss_agg,                     \
      std::optional<double> loss_agg_norm, double max_log_ratio
#define RLHF_PPO_LOSS_ARGS                                                                               \
  logprobs, old_logprobs, advantages, mask, values, old_values, returns, ref_logprobs, entropy, cliprange, \
      cliprange_high, dual_clip, cliprange_value, vf_coef, kl_coef, kl_estimator, entropy_coef, loss_agg,  \
      loss_agg_norm, max_log_ratio

namespace rlhf_ext {

// Validated inputs: contiguous [B, T], all float tensors in one compute dtype (their common dtype,
// or float32 / float64 when they differ), mask bool. Absent optional tensors stay undefined.
struct PpoLossInputs {
  at::Tensor logprobs, old_logprobs, advantages, mask;
  at::Tensor values, old_values, returns, ref_logprobs, entropy;
  ppo::Params params;
  at::ScalarType compute_dtype = at::kFloat;
  int64_t batch = 0, length = 0;
};

PpoLossInputs prepare_ppo_loss_inputs(RLHF_PPO_LOSS_PARAMS);

// float32 for float32/bf16/fp16 compute, float64 for float64.
at::ScalarType ppo_out_dtype(at::ScalarType compute_dtype);

// grad_out and out of the backward: [kNumOut] vectors of the output dtype, contiguous.
std::pair<at::Tensor, at::Tensor> prepare_ppo_loss_grad(const at::Tensor& grad_out, const at::Tensor& out,
                                                        const PpoLossInputs& in);

// The backward returns a gradient per differentiable input, in that input's dtype; an empty tensor
// stands for an absent one (values / entropy not given).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cast_ppo_loss_grads(at::Tensor grad_logprobs, at::Tensor grad_values,
                                                                   at::Tensor grad_entropy, RLHF_PPO_LOSS_PARAMS);

int parse_kl_estimator(std::string_view name, const char* arg);

// kl_penalty: returns (logprobs, ref_logprobs) contiguous in one compute dtype.
std::pair<at::Tensor, at::Tensor> prepare_kl_penalty_inputs(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                            double max_log_ratio);

}  // namespace rlhf_ext
