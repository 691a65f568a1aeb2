// The kernels of every op on each device: the C++ type of each op's entry function, one per schema in
// csrc/ops.cpp (same arguments, same order), and the declarations of <op>_cpu (defined in csrc/cpu/<family>.cpp)
// and <op>_cuda (csrc/cuda/<family>.cu) with that type, so the two devices' kernels of one op cannot drift apart.
// Each device registers them in one table: csrc/cpu/register.cpp, csrc/cuda/register.cu. Shapes and semantics
// are documented at the schemas.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string_view>
#include <tuple>

#include "checks/checks.h"  // RLHF_PPO_LOSS_PARAMS: the ppo_loss schema's argument list

namespace rlhf_ext {

// gae -> (advantages, returns), each [B, T].
using GaeFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& rewards, const at::Tensor& values,
                                                 const at::Tensor& mask, double gamma, double lam,
                                                 const c10::optional<at::Tensor>& last_values);

// masked_moments -> [3] (count, mean, M2); masked_whiten -> x's shape.
using MaskedMomentsFn = at::Tensor(const at::Tensor& x, const at::Tensor& mask);
using MaskedWhitenFn = at::Tensor(const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased,
                                  double eps);

// logprobs_forward -> (logprobs, entropy, lse), each logits.shape[:-1]; the backward gives logits' shape.
using LogprobsForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& logits,
                                                                         const at::Tensor& labels, double temperature,
                                                                         int64_t ignore_index, bool with_entropy,
                                                                         bool inplace_backward);
using LogprobsBackwardFn = at::Tensor(const c10::optional<at::Tensor>& grad_logprobs,
                                      const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                      const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                      double temperature, int64_t ignore_index);
using LogprobsBackwardInplaceFn = void(const c10::optional<at::Tensor>& grad_logprobs,
                                       const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                       const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                       double temperature, int64_t ignore_index);

// ppo_loss -> [16] statistics; ppo_loss_backward -> grads wrt (logprobs, values, entropy); kl_penalty -> [B, T].
using PpoLossFn = at::Tensor(RLHF_PPO_LOSS_PARAMS);
using PpoLossBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& grad_out,
                                                                         const at::Tensor& out, RLHF_PPO_LOSS_PARAMS);
using KlPenaltyFn = at::Tensor(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, std::string_view estimator,
                               double max_log_ratio);

// sample -> (tokens, logprobs, filtered_logprobs), each [B].
using SampleFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
    const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
    const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p,
    c10::optional<at::Generator> generator);

// One device's kernels, <op>_<device> with the op's type. Declaring the CUDA ones in a CPU-only build is
// harmless: only csrc/cuda/register.cu, built with the .cu files, refers to them.
#define RLHF_EXT_DECLARE_KERNELS(device)                        \
  GaeFn gae_##device;                                           \
  MaskedMomentsFn masked_moments_##device;                      \
  MaskedWhitenFn masked_whiten_##device;                        \
  LogprobsForwardFn logprobs_forward_##device;                  \
  LogprobsBackwardFn logprobs_backward_##device;                \
  LogprobsBackwardInplaceFn logprobs_backward_inplace_##device; \
  PpoLossFn ppo_loss_##device;                                  \
  PpoLossBackwardFn ppo_loss_backward_##device;                 \
  KlPenaltyFn kl_penalty_##device;                              \
  SampleFn sample_##device;

RLHF_EXT_DECLARE_KERNELS(cpu)
RLHF_EXT_DECLARE_KERNELS(cuda)

#undef RLHF_EXT_DECLARE_KERNELS

// CPU-only ops (no CUDA kernel: see csrc/ops.cpp). pack_linear_weight -> [ceil(N / 16), K, 16];
// packed_linear -> [M, N].
using PackLinearWeightFn = at::Tensor(const at::Tensor& weight);
using PackedLinearFn = at::Tensor(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                                  const c10::optional<at::Tensor>& bias);
PackLinearWeightFn pack_linear_weight_cpu;
PackedLinearFn packed_linear_cpu;
// decode_step -> the final-normed hidden states [B, H]; writes slot `slot` of key_cache / value_cache.
using DecodeStepFn = at::Tensor(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& key_mask,
                                int64_t slot, at::TensorList weights, const at::Tensor& final_norm, int64_t num_heads,
                                double eps, double scaling);
DecodeStepFn decode_step_cpu;

}  // namespace rlhf_ext
