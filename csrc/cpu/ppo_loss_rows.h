// CPU row kernels of ppo_loss / kl_penalty, compiled once per ISA: csrc/cpu/ppo_loss.cpp includes this file
// through csrc/cpu/per_isa.h, each time with RLHF_EXT_ISA (a namespace name) and RLHF_EXT_TARGET (a g++ `target`
// attribute, or nothing) defined. NO include guard.
#if !defined(RLHF_EXT_ISA) || !defined(RLHF_EXT_TARGET)
#error "include ppo_loss_rows.h through per_isa.h"
#endif

namespace rlhf_ext {
namespace ppo_cpu {
namespace RLHF_EXT_ISA {
namespace {

template <typename acc_t>
struct PolicyRowSums {
  acc_t policy, kl, tokens, clip, clip_low, clip_high, dual, approx_kl, approx_kl_k3, ratio, ratio_max;
};

// One row's policy (+ KL) sums over its valid tokens. Masked positions are selected away, never
// multiplied by 0, so garbage (inf/NaN) there cannot leak into the sums.
template <typename scalar_t, int kKl, typename acc_t = at::opmath_type<scalar_t>>
RLHF_EXT_TARGET PolicyRowSums<acc_t> policy_row_forward(const TokenPtrs<scalar_t>& x, int64_t off, int64_t T,
                                                        const ppo::Params& p) {
  const scalar_t *lp = x.logprobs + off, *old = x.old_logprobs + off, *adv = x.advantages + off;
  const scalar_t* ref = kKl != ppo::kNoKl ? x.ref_logprobs + off : nullptr;
  const uint8_t* m = x.mask + off;
  const acc_t max_lr = p.max_log_ratio, lo = p.ratio_low, hi = p.ratio_high, dual_clip = p.dual_clip;
  acc_t policy = 0, kl = 0, tokens = 0, clip = 0, clip_low = 0, clip_high = 0, dual = 0;
  acc_t approx_kl = 0, approx_kl_k3 = 0, ratio_sum = 0, ratio_max = 0;
#pragma omp simd reduction(+ : policy, kl, tokens, clip, clip_low, clip_high, dual, approx_kl, approx_kl_k3, \
                               ratio_sum) reduction(max : ratio_max)
  for (int64_t t = 0; t < T; ++t) {
    const bool valid = m[t] != 0;
    const acc_t logprob = static_cast<acc_t>(lp[t]);
    const auto tok = ppo::policy_token<acc_t>(logprob, static_cast<acc_t>(old[t]), static_cast<acc_t>(adv[t]),
                                              max_lr, lo, hi, dual_clip);
    policy += valid ? tok.loss : acc_t(0);
    tokens += valid ? acc_t(1) : acc_t(0);
    clip += valid ? tok.clipped : acc_t(0);
    clip_low += valid ? tok.clipped_low : acc_t(0);
    clip_high += valid ? tok.clipped_high : acc_t(0);
    dual += valid ? tok.dual_capped : acc_t(0);
    approx_kl += valid ? acc_t(0.5) * (tok.log_ratio * tok.log_ratio) : acc_t(0);
    approx_kl_k3 += valid ? ppo::k3_terms(tok.log_ratio).k3 : acc_t(0);
    ratio_sum += valid ? tok.ratio : acc_t(0);
    const acc_t r = valid ? tok.ratio : acc_t(0);
    ratio_max = r > ratio_max ? r : ratio_max;
    if constexpr (kKl != ppo::kNoKl) {
      // Computed before the select, not inside it: a load under `valid ? :` is a conditional load,
      // which the baseline ISA (no masked loads) cannot vectorise. (g++'s PRE still sinks the lone
      // ref[t] load of k1/k2 under the select, so those two stay scalar on the baseline ISA only.)
      const auto k = ppo::kl_token<kKl, acc_t>(logprob, static_cast<acc_t>(ref[t]), max_lr);
      kl += valid ? k.kl : acc_t(0);
    }
  }
  return {policy, kl, tokens, clip, clip_low, clip_high, dual, approx_kl, approx_kl_k3, ratio_sum, ratio_max};
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RLHF_EXT_TARGET void value_row_forward(const TokenPtrs<scalar_t>& x, int64_t off, int64_t T, acc_t clip,
                                       acc_t& loss, acc_t& clipped) {
  const scalar_t *v = x.values + off, *old = x.old_values + off, *ret = x.returns + off;
  const uint8_t* m = x.mask + off;
  acc_t loss_sum = 0, clipped_sum = 0;
#pragma omp simd reduction(+ : loss_sum, clipped_sum)
  for (int64_t t = 0; t < T; ++t) {
    const auto tok = ppo::value_token<acc_t>(static_cast<acc_t>(v[t]), static_cast<acc_t>(old[t]),
                                             static_cast<acc_t>(ret[t]), clip);
    loss_sum += m[t] ? tok.loss : acc_t(0);
    clipped_sum += m[t] ? tok.clipped : acc_t(0);
  }
  loss = loss_sum;
  clipped = clipped_sum;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RLHF_EXT_TARGET acc_t masked_row_sum(const scalar_t* x, const uint8_t* m, int64_t T) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < T; ++t) {
    const acc_t value = static_cast<acc_t>(x[t]);
    sum += m[t] ? value : acc_t(0);
  }
  return sum;
}

RLHF_EXT_TARGET int64_t row_count(const uint8_t* m, int64_t T) {
  int64_t n = 0;
#pragma omp simd reduction(+ : n)
  for (int64_t t = 0; t < T; ++t) n += m[t] ? 1 : 0;
  return n;
}

// Adds rows [row_begin, row_end) to the block's partial sums `part` (ppo::Part layout).
template <typename scalar_t, int kKl, typename acc_t = at::opmath_type<scalar_t>>
RLHF_EXT_TARGET void forward_rows(const TokenPtrs<scalar_t>& x, int64_t row_begin, int64_t row_end, int64_t T,
                                  const ppo::Params& p, double* part) {
  const acc_t value_clip = static_cast<acc_t>(p.cliprange_value);
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t off = b * T;
    const auto r = policy_row_forward<scalar_t, kKl>(x, off, T, p);
    if (r.tokens == acc_t(0)) continue;  // an empty row is not a sequence of the seq-mean modes
    const double scale = p.loss_agg == ppo::kSeqMeanTokenMean ? 1.0 / static_cast<double>(r.tokens) : 1.0;
    part[ppo::pPolicy] += static_cast<double>(r.policy) * scale;
    part[ppo::pKl] += static_cast<double>(r.kl) * scale;
    part[ppo::pTokens] += static_cast<double>(r.tokens);
    part[ppo::pSeqs] += 1.0;
    part[ppo::pClip] += static_cast<double>(r.clip);
    part[ppo::pClipLow] += static_cast<double>(r.clip_low);
    part[ppo::pClipHigh] += static_cast<double>(r.clip_high);
    part[ppo::pDual] += static_cast<double>(r.dual);
    part[ppo::pApproxKl] += static_cast<double>(r.approx_kl);
    part[ppo::pApproxKlK3] += static_cast<double>(r.approx_kl_k3);
    part[ppo::pRatio] += static_cast<double>(r.ratio);
    part[ppo::pRatioMax] = std::max(part[ppo::pRatioMax], static_cast<double>(r.ratio_max));
    if (x.values) {
      acc_t loss, clipped;
      value_row_forward<scalar_t>(x, off, T, value_clip, loss, clipped);
      part[ppo::pValue] += static_cast<double>(loss) * scale;
      part[ppo::pValueClip] += static_cast<double>(clipped);
    }
    if (x.entropy) {
      part[ppo::pEntropy] += static_cast<double>(masked_row_sum<scalar_t>(x.entropy + off, x.mask + off, T)) * scale;
    }
  }
}

// Writes the gradients of rows [row_begin, row_end).
template <typename scalar_t, int kKl, typename acc_t = at::opmath_type<scalar_t>>
RLHF_EXT_TARGET void backward_rows(const TokenPtrs<scalar_t>& x, int64_t row_begin, int64_t row_end, int64_t T,
                                   const ppo::Params& p, const GradScales& g) {
  const acc_t max_lr = p.max_log_ratio, lo = p.ratio_low, hi = p.ratio_high, dual_clip = p.dual_clip;
  const acc_t value_clip = static_cast<acc_t>(p.cliprange_value);
  // Gradients are computed in acc_t; stored as float16 they saturate at 65504 rather than overflow to inf.
  const acc_t grad_max = static_cast<acc_t>(std::numeric_limits<scalar_t>::max());
  for (int64_t b = row_begin; b < row_end; ++b) {
    const int64_t off = b * T;
    const uint8_t* m = x.mask + off;
    // Only seq-mean-token-mean weights depend on the row's own token count.
    const double row_tokens = p.loss_agg == ppo::kSeqMeanTokenMean ? static_cast<double>(row_count(m, T)) : 1.0;
    const double w = ppo::token_weight(p, g.num_tokens, g.num_seqs, row_tokens);
    const acc_t w_policy = static_cast<acc_t>(w * g.policy), w_kl = static_cast<acc_t>(w * g.kl);
    const scalar_t *lp = x.logprobs + off, *old = x.old_logprobs + off, *adv = x.advantages + off;
    const scalar_t* ref = kKl != ppo::kNoKl ? x.ref_logprobs + off : nullptr;
    scalar_t* d_lp = x.grad_logprobs + off;
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) {
      const acc_t logprob = static_cast<acc_t>(lp[t]);
      const auto tok = ppo::policy_token<acc_t>(logprob, static_cast<acc_t>(old[t]), static_cast<acc_t>(adv[t]),
                                                max_lr, lo, hi, dual_clip);
      acc_t grad = w_policy * tok.dloss;
      if constexpr (kKl != ppo::kNoKl) {
        grad += w_kl * ppo::kl_token<kKl, acc_t>(logprob, static_cast<acc_t>(ref[t]), max_lr).dkl;
      }
      d_lp[t] = static_cast<scalar_t>(ppo::saturate(m[t] ? grad : acc_t(0), grad_max));
    }
    if (x.grad_values) {
      const acc_t w_value = static_cast<acc_t>(w * g.value);
      const scalar_t *v = x.values + off, *v_old = x.old_values + off, *ret = x.returns + off;
      scalar_t* d_v = x.grad_values + off;
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) {
        const auto tok = ppo::value_token<acc_t>(static_cast<acc_t>(v[t]), static_cast<acc_t>(v_old[t]),
                                                 static_cast<acc_t>(ret[t]), value_clip);
        d_v[t] = static_cast<scalar_t>(ppo::saturate(m[t] ? w_value * tok.dloss : acc_t(0), grad_max));
      }
    }
    if (x.grad_entropy) {
      const acc_t w_entropy = static_cast<acc_t>(w * g.entropy);
      scalar_t* d_ent = x.grad_entropy + off;
      const acc_t d_entropy = ppo::saturate(w_entropy, grad_max);
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) d_ent[t] = static_cast<scalar_t>(m[t] ? d_entropy : acc_t(0));
    }
  }
}

template <typename scalar_t, int kKl, typename acc_t = at::opmath_type<scalar_t>>
RLHF_EXT_TARGET void kl_penalty_span(const scalar_t* lp, const scalar_t* ref, int64_t n, acc_t max_lr, acc_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = ppo::kl_token<kKl, acc_t>(static_cast<acc_t>(lp[i]), static_cast<acc_t>(ref[i]), max_lr).kl;
  }
}

}  // namespace
}  // namespace RLHF_EXT_ISA
}  // namespace ppo_cpu
}  // namespace rlhf_ext
