// Simulator harness entry points for csrc/cuda/ppo_loss.cuh (calling convention: sim_common.cuh).
// T is the data type, A its accumulation type (float32, float64 for float64). Per-token arrays are [B, T_];
// optional ones (ref_logprobs, values, old_values, returns, entropy) may be NULL. `params` holds
// ppo::Params as 11 doubles: ratio_low, ratio_high, dual_clip, cliprange_value, vf_coef, kl_coef, entropy_coef,
// loss_agg_norm, max_log_ratio, kl_estimator, loss_agg.
//   sim_ppo_loss_forward_<dtype>(logprobs, old_logprobs, advantages, ref_logprobs, values, old_values, returns,
//       entropy, mask, B, T_, params, workspace [forward_blocks(B) * kNumPart] double (in/out), out [kNumOut] A)
//     runs the forward kernel and the combine kernel (launch_ppo_loss_forward); the workspace holds the
//     per-block partials afterwards.
//   sim_ppo_loss_backward_<dtype>(same inputs, B, T_, params, grad_out [kNumOut] A, out [kNumOut] A,
//       grad_logprobs [B, T_] T, grad_values [B, T_] T or NULL, grad_entropy [B, T_] T or NULL)
//   sim_kl_penalty_<dtype>(logprobs, ref_logprobs, n, estimator, max_log_ratio, out [n] A)
//   sim_ppo_forward_blocks(B) -> forward_blocks(B) (the workspace size / kNumPart)
#include "ppo_loss.cuh"
#include "sim_common.cuh"

namespace {

using rlhf_ext::ppo::Params;
using rlhf_ext::ppo_cuda::TokenArgs;

Params unpack(const double* v) {
  Params p;
  p.ratio_low = v[0];
  p.ratio_high = v[1];
  p.dual_clip = v[2];
  p.cliprange_value = v[3];
  p.vf_coef = v[4];
  p.kl_coef = v[5];
  p.entropy_coef = v[6];
  p.loss_agg_norm = v[7];
  p.max_log_ratio = v[8];
  p.kl_estimator = static_cast<int>(v[9]);
  p.loss_agg = static_cast<int>(v[10]);
  return p;
}

template <typename T>
TokenArgs<T> upload(rlhf_ext::sim::Scope& s, const T* logprobs, const T* old_logprobs, const T* advantages,
                    const T* ref_logprobs, const T* values, const T* old_values, const T* returns, const T* entropy,
                    const bool* mask, int64_t B, int64_t T_) {
  const int64_t n = B * T_;
  return {s.in(logprobs, n), s.in(old_logprobs, n), s.in(advantages, n), s.in(ref_logprobs, n), s.in(values, n),
          s.in(old_values, n), s.in(returns, n), s.in(entropy, n), s.in(mask, n), B, T_};
}

}  // namespace

#define SIM_PPO(SUFFIX, T, A)                                                                                       \
  extern "C" int sim_ppo_loss_forward_##SUFFIX(const T* lp, const T* old, const T* adv, const T* ref, const T* v,   \
                                               const T* old_v, const T* ret, const T* ent, const bool* mask,        \
                                               int64_t B, int64_t T_, const double* params, double* workspace,      \
                                               A* out) {                                                            \
    rlhf_ext::sim::Scope s;                                                                                         \
    const TokenArgs<T> x = upload(s, lp, old, adv, ref, v, old_v, ret, ent, mask, B, T_);                          \
    double* d_ws = s.inout(workspace, rlhf_ext::ppo_cuda::forward_blocks(B) * rlhf_ext::ppo::kNumPart);           \
    A* d_out = s.inout(out, rlhf_ext::ppo::kNumOut);                                                                \
    if (!s.ok()) return s.finish();                                                                                 \
    return s.finish(rlhf_ext::ppo_cuda::launch_ppo_loss_forward<T>(x, unpack(params), d_ws, d_out, nullptr));      \
  }                                                                                                                 \
  extern "C" int sim_ppo_loss_backward_##SUFFIX(const T* lp, const T* old, const T* adv, const T* ref, const T* v,  \
                                                const T* old_v, const T* ret, const T* ent, const bool* mask,       \
                                                int64_t B, int64_t T_, const double* params, const A* grad_out,     \
                                                const A* out, T* grad_lp, T* grad_v, T* grad_ent) {                 \
    rlhf_ext::sim::Scope s;                                                                                         \
    const TokenArgs<T> x = upload(s, lp, old, adv, ref, v, old_v, ret, ent, mask, B, T_);                          \
    const A* d_grad_out = s.in(grad_out, rlhf_ext::ppo::kNumOut);                                                   \
    const A* d_out = s.in(out, rlhf_ext::ppo::kNumOut);                                                             \
    T* d_glp = s.inout(grad_lp, B * T_);                                                                            \
    T* d_gv = s.inout(grad_v, B * T_);                                                                              \
    T* d_gent = s.inout(grad_ent, B * T_);                                                                          \
    if (!s.ok()) return s.finish();                                                                                 \
    return s.finish(rlhf_ext::ppo_cuda::launch_ppo_loss_backward<T>(x, unpack(params), d_grad_out, d_out, d_glp,   \
                                                                    d_gv, d_gent, nullptr));                        \
  }                                                                                                                 \
  extern "C" int sim_kl_penalty_##SUFFIX(const T* lp, const T* ref, int64_t n, int64_t estimator,                  \
                                         double max_log_ratio, A* out) {                                            \
    rlhf_ext::sim::Scope s;                                                                                         \
    const T* d_lp = s.in(lp, n);                                                                                    \
    const T* d_ref = s.in(ref, n);                                                                                  \
    A* d_out = s.inout(out, n);                                                                                     \
    if (!s.ok()) return s.finish();                                                                                 \
    return s.finish(rlhf_ext::ppo_cuda::launch_kl_penalty<T>(d_lp, d_ref, n, static_cast<int>(estimator),          \
                                                             static_cast<A>(max_log_ratio), d_out, nullptr));       \
  }
SIM_PPO(f32, float, float)
SIM_PPO(f64, double, double)
SIM_PPO(bf16, __nv_bfloat16, float)
SIM_PPO(f16, __half, float)

extern "C" int sim_ppo_forward_blocks(int64_t B) { return rlhf_ext::ppo_cuda::forward_blocks(B); }
