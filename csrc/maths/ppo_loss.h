// Per-token maths of the fused PPO/GRPO loss, shared by the CPU kernel (csrc/cpu/ppo_loss.cpp) and the
// CUDA kernels (csrc/cuda/ppo_loss.cuh) so that both compute exactly the same formulas. Framework-free:
// plain C++ that nvcc and g++ both compile (host+device under nvcc).
//
// Gradients reproduce what autograd gives for the plain-PyTorch composition in
// rlhf_ext/ops/reference.py: clamp passes the gradient on the closed interval [lo, hi];
// maximum/minimum split it in halves on ties (torch's rule).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define RLHF_PPO_HD __host__ __device__ __forceinline__
#else
#define RLHF_PPO_HD inline __attribute__((always_inline))
#endif

namespace rlhf_ext {
namespace ppo {

enum KlEstimator : int { kNoKl = 0, kK1 = 1, kK2 = 2, kK3 = 3 };
enum LossAgg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

// Layout of the op's output vector (float32, float64 for float64 inputs). rlhf_ext/ops/ppo_loss.py
// names the entries; keep the two in sync.
enum Out : int {
  kLoss = 0, kPolicyLoss, kValueLoss, kKl, kEntropy,
  kClipfrac, kClipfracLow, kClipfracHigh, kDualClipfrac,
  kApproxKl, kApproxKlK3, kRatioMean, kRatioMax, kValueClipfrac,
  kNumTokens, kNumSeqs,
  kNumOut
};

// Partial sums per row block (CPU) or thread block (CUDA), merged in a fixed order. The four loss
// terms are already scaled per row (1/n_row for seq-mean-token-mean); the statistics are raw sums.
enum Part : int {
  pPolicy = 0, pValue, pKl, pEntropy, pTokens, pSeqs,
  pClip, pClipLow, pClipHigh, pDual, pApproxKl, pApproxKlK3, pRatio, pValueClip, pRatioMax,
  kNumPart
};

// Scalar arguments after validation (host side fills it; kernels take it by value).
struct Params {
  double ratio_low = 0.8, ratio_high = 1.2;  // 1 - cliprange, 1 + (cliprange_high or cliprange)
  double dual_clip = 0;                      // c > 1; 0 = off
  double cliprange_value = 0.2;              // < 0: no value clipping
  double vf_coef = 0.1, kl_coef = 0, entropy_coef = 0;
  double loss_agg_norm = 1;                  // Dr.GRPO constant (seq-mean-token-sum-norm)
  double max_log_ratio = 20;                 // clamp of every log-ratio that goes through exp
  int kl_estimator = kNoKl;                  // kNoKl when ref_logprobs is absent
  int loss_agg = kTokenMean;
};

// exp for float on the host: Cody-Waite range reduction and a degree-7 Taylor polynomial, written
// without calls or branches so that g++ vectorises the token loops (std::exp blocks that). About
// 1 ulp. Valid for |x| <= 87; callers clamp to |x| <= max_log_ratio <= 80.
RLHF_PPO_HD float host_expf(float x) {
  const float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (default rounding)
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // |r| <= ln2/2
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

RLHF_PPO_HD float ppo_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_expf(x);
#endif
}

RLHF_PPO_HD double ppo_exp(double x) { return exp(x); }

// k3 = exp(e) - 1 - e and expm1(e) = exp(e) - 1, without cancellation. (exp(e) - e) - 1, and even
// expm1(e) - e, lose about log2(2 / |e|) bits for small |e| (all of float's near |e| = 1e-7), so for |e| <= 1
// both come from the series (exp(e) - 1 - e) / e^2 = sum_j e^j / (j + 2)!, in Horner form
// 1/2 (1 + e/3 (1 + e/4 (...))), through j = 10 for float and j = 18 for double (truncation below 2e-10 and
// 1e-19 relative). Above |e| = 1, exp(e) - 1 - e loses at most ~2 bits. Both branches are computed and one is
// selected, so the token loops stay branch-free; NaN takes the exp branch and propagates.
template <typename acc_t>
struct K3Terms {
  acc_t k3, expm1;
};

// 1 + e/k (1 + e/(k + 1) (... (1 + e/kLast))), unrolled at compile time (a plain loop could keep g++ from
// vectorising the token loops around it).
template <int k, int kLast, typename acc_t>
RLHF_PPO_HD acc_t k3_horner(acc_t e) {
  if constexpr (k > kLast) {
    return acc_t(1);
  } else {
    return acc_t(1) + e * k3_horner<k + 1, kLast>(e) * (acc_t(1) / acc_t(k));
  }
}

template <typename acc_t>
RLHF_PPO_HD K3Terms<acc_t> k3_terms(acc_t e) {
  constexpr int kLast = sizeof(acc_t) == 4 ? 12 : 20;  // the last series term is e^(kLast - 2) / kLast!
  const acc_t series = e * e * (acc_t(0.5) * k3_horner<3, kLast>(e));
  const acc_t em1 = ppo_exp(e) - acc_t(1);
  const bool small = e >= acc_t(-1) && e <= acc_t(1);
  K3Terms<acc_t> out;
  out.k3 = small ? series : em1 - e;
  out.expm1 = small ? e + series : em1;
  return out;
}

// NaN passes through (both comparisons are false), as with torch.clamp.
template <typename acc_t>
RLHF_PPO_HD acc_t clampv(acc_t x, acc_t lo, acc_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// x limited to [-max_finite, max_finite] when it is finite: a gradient stored in a narrower dtype than it was
// computed in (float16: 65504) saturates instead of overflowing to inf. Infinities and NaN pass through.
template <typename acc_t>
RLHF_PPO_HD acc_t saturate(acc_t x, acc_t max_finite) {
  const acc_t inf = acc_t(INFINITY);
  return (x > max_finite && x < inf) ? max_finite : ((x < -max_finite && x > -inf) ? -max_finite : x);
}

// Share of the gradient of maximum(a, b) that goes to a (torch: all, half on a tie, none).
template <typename acc_t>
RLHF_PPO_HD acc_t max_share(acc_t a, acc_t b) {
  return a > b ? acc_t(1) : (a == b ? acc_t(0.5) : acc_t(0));
}

template <typename acc_t>
struct PolicyToken {
  acc_t log_ratio, ratio, loss, dloss;  // dloss: d loss / d logprob
  acc_t clipped, clipped_low, clipped_high, dual_capped;  // 0 or 1 (floats keep the loops vectorisable)
};

// pg = max(-A r, -A clip(r, lo, hi)), r = exp(clamp(lp - old, +-M)); with dual clip c and A < 0,
// pg = min(pg, -A c).
template <typename acc_t>
RLHF_PPO_HD PolicyToken<acc_t> policy_token(acc_t logprob, acc_t old_logprob, acc_t advantage, acc_t max_lr,
                                             acc_t lo, acc_t hi, acc_t dual_clip) {
  PolicyToken<acc_t> out;
  const acc_t raw = logprob - old_logprob;
  out.log_ratio = clampv(raw, -max_lr, max_lr);
  out.ratio = ppo_exp(out.log_ratio);
  const acc_t neg_adv = -advantage;
  const acc_t loss1 = neg_adv * out.ratio;
  const acc_t loss2 = neg_adv * clampv(out.ratio, lo, hi);
  const acc_t pg = loss1 > loss2 ? loss1 : loss2;
  out.clipped = loss2 > loss1 ? acc_t(1) : acc_t(0);
  out.clipped_low = out.ratio < lo ? out.clipped : acc_t(0);
  out.clipped_high = out.ratio > hi ? out.clipped : acc_t(0);
  const acc_t ratio_in = (out.ratio >= lo && out.ratio <= hi) ? acc_t(1) : acc_t(0);
  const acc_t share1 = max_share(loss1, loss2);
  acc_t dpg_dratio = neg_adv * (share1 + (acc_t(1) - share1) * ratio_in);
  const bool dual_on = dual_clip > acc_t(0) && advantage < acc_t(0);
  const acc_t cap = neg_adv * dual_clip;
  const bool capped = dual_on && pg > cap;
  out.dual_capped = capped ? acc_t(1) : acc_t(0);
  out.loss = capped ? cap : pg;
  dpg_dratio = dual_on ? dpg_dratio * max_share(cap, pg) : dpg_dratio;  // minimum(cap, pg): pg's share
  // Outside the clamp the gradient is 0, selected rather than multiplied (an infinite advantage times 0 is NaN).
  const bool lr_in = raw >= -max_lr && raw <= max_lr;
  out.dloss = lr_in ? dpg_dratio * out.ratio : acc_t(0);
  return out;
}

template <typename acc_t>
struct ValueToken {
  acc_t loss, dloss;  // dloss: d loss / d value
  acc_t clipped;      // 0 or 1
};

// 0.5 * max((v - R)^2, (clamp(v, v_old - c, v_old + c) - R)^2); plain 0.5 (v - R)^2 when c < 0.
template <typename acc_t>
RLHF_PPO_HD ValueToken<acc_t> value_token(acc_t value, acc_t old_value, acc_t ret, acc_t clip) {
  ValueToken<acc_t> out;
  const acc_t err1 = value - ret;
  const acc_t sq1 = err1 * err1;
  // Computed whether or not clipping is on and selected at the end: no branch in the token loop.
  const bool clip_on = clip >= acc_t(0);
  const acc_t lo = old_value - clip, hi = old_value + clip;
  // A NaN old value makes the bounds NaN; clampv would then pass `value` through and hide it (torch.clamp
  // with NaN bounds gives NaN), so the NaN is carried explicitly.
  const acc_t err2 = (old_value != old_value ? old_value : clampv(value, lo, hi)) - ret;
  const acc_t sq2 = err2 * err2;
  const acc_t share1 = max_share(sq1, sq2);
  const bool value_in = value >= lo && value <= hi;
  out.loss = acc_t(0.5) * (clip_on && !(sq2 <= sq1) ? sq2 : sq1);  // NaN propagates, as torch.maximum
  out.clipped = clip_on && sq2 > sq1 ? acc_t(1) : acc_t(0);
  // Selected, not multiplied by 0/1, for the same reason as the policy gradient's clamp.
  const acc_t dclipped = value_in ? (acc_t(1) - share1) * err2 : acc_t(0);
  out.dloss = clip_on ? share1 * err1 + dclipped : err1;
  return out;
}

template <typename acc_t>
struct KlToken {
  acc_t kl, dkl;  // dkl: d kl / d logprob
};

// k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 with -d = ref - logprob clamped to +-M (the only
// estimator that exponentiates, so the only one clamped), through k3_terms (no cancellation).
template <int kEstimator, typename acc_t>
RLHF_PPO_HD KlToken<acc_t> kl_token(acc_t logprob, acc_t ref_logprob, acc_t max_lr) {
  KlToken<acc_t> out;
  if (kEstimator == kK1) {
    out.kl = logprob - ref_logprob;
    out.dkl = acc_t(1);
  } else if (kEstimator == kK2) {
    const acc_t d = logprob - ref_logprob;
    out.kl = acc_t(0.5) * (d * d);
    out.dkl = d;
  } else {
    const acc_t raw = ref_logprob - logprob;
    const acc_t e = clampv(raw, -max_lr, max_lr);
    const K3Terms<acc_t> k3 = k3_terms(e);
    out.kl = k3.k3;
    const acc_t in = (raw >= -max_lr && raw <= max_lr) ? acc_t(1) : acc_t(0);
    out.dkl = -k3.expm1 * in;
  }
  return out;
}

// Denominator of the aggregated loss terms (see rlhf_ext/ops/ppo_loss.py for the semantics).
RLHF_PPO_HD double agg_denominator(const Params& p, double num_tokens, double num_seqs) {
  switch (p.loss_agg) {
    case kTokenMean: return num_tokens;
    case kSeqMeanTokenSumNorm: return num_seqs * p.loss_agg_norm;
    default: return num_seqs;
  }
}

// Weight of a token of a row with `row_tokens` valid tokens in the aggregated loss.
RLHF_PPO_HD double token_weight(const Params& p, double num_tokens, double num_seqs, double row_tokens) {
  const double denom = agg_denominator(p, num_tokens, num_seqs);
  if (denom <= 0 || row_tokens <= 0) return 0;
  return p.loss_agg == kSeqMeanTokenMean ? 1.0 / (row_tokens * denom) : 1.0 / denom;
}

// Turns the merged partial sums into the output vector. An empty mask gives zeros, never NaN.
template <typename out_t>
RLHF_PPO_HD void finalize(const double* part, const Params& p, out_t* out) {
  const double n = part[pTokens], s = part[pSeqs];
  const double denom = agg_denominator(p, n, s);
  const double inv_d = denom > 0 ? 1.0 / denom : 0.0;
  const double inv_n = n > 0 ? 1.0 / n : 0.0;
  const double policy = part[pPolicy] * inv_d, value = part[pValue] * inv_d;
  const double kl = part[pKl] * inv_d, entropy = part[pEntropy] * inv_d;
  out[kLoss] = static_cast<out_t>(policy + p.vf_coef * value + p.kl_coef * kl - p.entropy_coef * entropy);
  out[kPolicyLoss] = static_cast<out_t>(policy);
  out[kValueLoss] = static_cast<out_t>(value);
  out[kKl] = static_cast<out_t>(kl);
  out[kEntropy] = static_cast<out_t>(entropy);
  out[kClipfrac] = static_cast<out_t>(part[pClip] * inv_n);
  out[kClipfracLow] = static_cast<out_t>(part[pClipLow] * inv_n);
  out[kClipfracHigh] = static_cast<out_t>(part[pClipHigh] * inv_n);
  out[kDualClipfrac] = static_cast<out_t>(part[pDual] * inv_n);
  out[kApproxKl] = static_cast<out_t>(part[pApproxKl] * inv_n);
  out[kApproxKlK3] = static_cast<out_t>(part[pApproxKlK3] * inv_n);
  out[kRatioMean] = static_cast<out_t>(part[pRatio] * inv_n);
  out[kRatioMax] = static_cast<out_t>(part[pRatioMax]);
  out[kValueClipfrac] = static_cast<out_t>(part[pValueClip] * inv_n);
  out[kNumTokens] = static_cast<out_t>(n);
  out[kNumSeqs] = static_cast<out_t>(s);
}

}  // namespace ppo
}  // namespace rlhf_ext
