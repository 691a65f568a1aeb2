// Row kernels for gather_logprobs on CPU, written once with at::vec::Vectorized and compiled once per
// vector ISA by csrc/cpu/logprobs_isa.h (which defines CPU_CAPABILITY first, so the Vectorized types
// resolve to that ISA). Everything here has internal linkage: every ISA gets its own
// copy and no symbol is shared between differently compiled objects.
//
// Forward, per row of x = z / T (V entries), in ONE pass over memory: the row is walked in chunks of
// kChunk entries; each chunk is converted to the accumulation type into an L1-resident buffer while
// its per-lane maximum is taken (pass A), then exp(x - m) is summed from that buffer (pass B). Per SIMD
// lane we keep an online triple (m, s, w):
//   m = running max,  s = sum exp(x - m),  w = sum exp(x - m) * (x - m)
// and when m grows to m':  s <- s * e^(m - m'),  w <- e^(m - m') * (w + s * (m - m')).
// At the end (lanes merged the same way): lse = m + log s, entropy = log s - w / s. Everything stays
// relative to the max, so logits around +-1e4 lose no precision to cancellation.
//
// Backward, per row: p = exp(x - lse), and with g = grad_logprobs, h = grad_entropy, H = entropy
//   dz_j = (g * [j == label] - p_j * (g + h * (x_j - lse + H))) / T
// (d lp / dx = onehot - p;  d H / dx_j = -p_j (log p_j + H);  dx/dz = 1/T). One read, one write.
//
// -inf logits (masked vocabulary) are safe: x - m is clamped at kClampLow (exp of it is exactly 0 in
// the accumulation type) before it multiplies anything, so 0 * -inf never happens. A NaN (or +inf)
// logit makes its row's log-prob, entropy, lse and whole gradient NaN (the CUDA kernels do the same).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "logprobs_kernels.h"

namespace rlhf_ext::logprobs_cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 1024;  // entries per chunk: 4 KiB of float in L1, a multiple of every step

template <typename T>
constexpr T clamp_low() {
  // Below these, exp() is exactly 0 in T (float underflows below -103.3, double below -745.2).
  return std::is_same_v<T, double> ? T(-800) : T(-200);
}

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// Loads/stores one step of 2 accumulation vectors from/to the storage type.
template <typename scalar_t>
struct Io {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static void load2(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static void store2(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <typename reduced_t>
struct IoReduced {
  using Vec = Vectorized<float>;
  static constexpr int64_t kStep = Vectorized<reduced_t>::size();
  static_assert(kStep == 2 * Vec::size(), "a reduced-precision vector holds two float vectors");
  static void load2(const reduced_t* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<reduced_t>(Vectorized<reduced_t>::loadu(p));
  }
  static void store2(reduced_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<reduced_t>(a, b).store(p);
  }
};
template <>
struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};
template <>
struct Io<c10::Half> : IoReduced<c10::Half> {};

template <typename acc>
struct RowStats {
  acc max, log_sum, wsum;  // m, log s, w / s
};

template <typename scalar_t, bool kEntropy>
RowStats<acc_t<scalar_t>> row_stats(const scalar_t* z, int64_t V, acc_t<scalar_t> inv_t) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  static_assert(kChunk % kStep == 0, "chunks hold whole steps");
  const acc lowest = std::numeric_limits<acc>::lowest();
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const Vec v_inv_t(inv_t), v_lowest(lowest), v_clamp(clamp_low<acc>());
  alignas(64) acc buf[kChunk];

  Vec m(lowest), s(acc(0)), w(acc(0));
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t len = std::min(kChunk, V - start);
    const scalar_t* zc = z + start;
    // Pass A: x = z / T into buf, per-lane chunk max.
    Vec cm0(lowest), cm1(lowest);
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      Vec a, b;
      Io<scalar_t>::load2(zc + i, a, b);
      a = a * v_inv_t;
      b = b * v_inv_t;
      a.store(buf + i);
      b.store(buf + i + W);
      cm0 = at::vec::maximum(cm0, a);
      cm1 = at::vec::maximum(cm1, b);
    }
    const int64_t padded = (len + W - 1) / W * W;
    for (; i < len; ++i) buf[i] = static_cast<acc>(zc[i]) * inv_t;
    for (int64_t j = len; j < padded; ++j) buf[j] = neg_inf;  // padding contributes exp(-inf) = 0
    for (int64_t j = len / kStep * kStep; j < padded; j += W) cm0 = at::vec::maximum(cm0, Vec::loadu(buf + j));
    const Vec m_new = at::vec::maximum(m, at::vec::maximum(cm0, cm1));
    // <= 0; exactly 0 while a lane has seen only -inf. Clamped where exp() is 0 anyway: from the initial
    // lowest() to a max near the dtype's limit, m - m_new overflows to -inf, and s * shift = 0 * -inf = NaN.
    const Vec shift = at::vec::maximum(m - m_new, v_clamp);
    const Vec scale = vexp(shift);
    if constexpr (kEntropy) w = scale * (w + s * shift);
    s = s * scale;
    m = m_new;
    // Pass B: sums from the L1-resident buffer, two independent accumulators for ILP.
    Vec s0(acc(0)), s1(acc(0)), w0(acc(0)), w1(acc(0));
    int64_t j = 0;
    for (; j + 2 * W <= padded; j += 2 * W) {
      const Vec d0 = at::vec::maximum(Vec::loadu(buf + j) - m, v_clamp);
      const Vec d1 = at::vec::maximum(Vec::loadu(buf + j + W) - m, v_clamp);
      const Vec e0 = vexp(d0), e1 = vexp(d1);
      s0 = s0 + e0;
      s1 = s1 + e1;
      if constexpr (kEntropy) {
        w0 = at::vec::fmadd(e0, d0, w0);
        w1 = at::vec::fmadd(e1, d1, w1);
      }
    }
    if (j < padded) {
      const Vec d0 = at::vec::maximum(Vec::loadu(buf + j) - m, v_clamp);
      const Vec e0 = vexp(d0);
      s0 = s0 + e0;
      if constexpr (kEntropy) w0 = at::vec::fmadd(e0, d0, w0);
    }
    s = s + s0 + s1;
    if constexpr (kEntropy) w = w + w0 + w1;
  }

  // Merge the W lanes into one (m, s, w).
  alignas(64) acc ml[W], sl[W], wl[W];
  m.store(ml);
  s.store(sl);
  w.store(wl);
  acc M = lowest;
  for (int64_t l = 0; l < W; ++l) M = std::max(M, ml[l]);
  acc S = 0, Wsum = 0;
  for (int64_t l = 0; l < W; ++l) {
    const acc shift = std::max(ml[l] - M, clamp_low<acc>());  // clamped as above: lowest() - M may be -inf
    const acc f = std::exp(shift);
    S += sl[l] * f;
    if constexpr (kEntropy) Wsum += f * (wl[l] + sl[l] * shift);
  }
  return {M, std::log(S), kEntropy ? Wsum / S : acc(0)};
}

template <typename scalar_t, bool kEntropy>
void forward_rows_impl(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = a.labels[r];
    if (label == a.ignore_index) {
      a.logprobs[r] = 0;
      a.entropy[r] = 0;
      a.lse[r] = 0;
      continue;
    }
    const scalar_t* z = a.logits + a.row_offsets[r];
    const auto st = row_stats<scalar_t, kEntropy>(z, a.vocab, a.inv_temperature);
    const acc x_label = static_cast<acc>(z[label]) * a.inv_temperature;
    a.logprobs[r] = (x_label - st.max) - st.log_sum;
    a.lse[r] = st.max + st.log_sum;
    a.entropy[r] = kEntropy ? st.log_sum - st.wsum : acc(0);
  }
}

template <typename scalar_t>
void forward_rows(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  if (a.with_entropy) {
    forward_rows_impl<scalar_t, true>(a, begin, end);
  } else {
    forward_rows_impl<scalar_t, false>(a, begin, end);
  }
}

// dz = p * (coef0 + coef1 * (x - lse)) for every entry; the label entry then gets + g / T.
template <typename scalar_t, bool kEntropy>
void backward_row(const scalar_t* z, scalar_t* dz, int64_t V, int64_t label, acc_t<scalar_t> inv_t,
                  acc_t<scalar_t> lse, acc_t<scalar_t> coef0, acc_t<scalar_t> coef1, acc_t<scalar_t> g_label) {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  const acc low = clamp_low<acc>();
  // The label entry is computed before the sweep: with an in-place backward the sweep overwrites it.
  const acc lp_label = std::max(static_cast<acc>(z[label]) * inv_t - lse, low);
  const acc dz_label = g_label + std::exp(lp_label) * (kEntropy ? coef0 + coef1 * lp_label : coef0);
  const Vec v_inv_t(inv_t), v_lse(lse), v_low(low), v_c0(coef0), v_c1(coef1);
  int64_t i = 0;
  for (; i + kStep <= V; i += kStep) {
    Vec a, b;
    Io<scalar_t>::load2(z + i, a, b);
    // x = z / T rounded first, exactly as the forward rounded it before taking lse: a fused z * (1/T) - lse
    // differs from it by up to half an ulp of x, which for |x| ~ 1e30 is ~1e23 and exp() turns into inf.
    const Vec lpa = at::vec::maximum(a * v_inv_t - v_lse, v_low);
    const Vec lpb = at::vec::maximum(b * v_inv_t - v_lse, v_low);
    Vec ga, gb;
    if constexpr (kEntropy) {
      ga = vexp(lpa) * at::vec::fmadd(v_c1, lpa, v_c0);
      gb = vexp(lpb) * at::vec::fmadd(v_c1, lpb, v_c0);
    } else {
      ga = vexp(lpa) * v_c0;
      gb = vexp(lpb) * v_c0;
    }
    // A NaN logit or lse gives a NaN gradient, as in the scalar tail (and on CUDA): exp_u20's range
    // reduction does not carry NaN through, so put it back.
    ga = Vec::blendv(ga, lpa, lpa.isnan());
    gb = Vec::blendv(gb, lpb, lpb.isnan());
    Io<scalar_t>::store2(dz + i, ga, gb);
  }
  for (; i < V; ++i) {
    const acc lp = std::max(static_cast<acc>(z[i]) * inv_t - lse, low);
    dz[i] = static_cast<scalar_t>(std::exp(lp) * (kEntropy ? coef0 + coef1 * lp : coef0));
  }
  dz[label] = static_cast<scalar_t>(dz_label);
}

template <typename scalar_t>
void backward_rows(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = a.labels[r];
    scalar_t* dz = a.grad + a.out_offsets[r];
    if (label == a.ignore_index) {
      std::memset(static_cast<void*>(dz), 0, sizeof(scalar_t) * a.vocab);  // all-zero bits are +0
      continue;
    }
    const scalar_t* z = a.logits + a.in_offsets[r];
    const acc g = a.grad_logprobs ? a.grad_logprobs[r] : acc(0);
    const acc h = a.grad_entropy ? a.grad_entropy[r] : acc(0);
    // dz_j = p_j * (-(g + h * H) / T - h / T * lp_j) + [j == label] * g / T
    const acc inv_t = a.inv_temperature;
    const acc coef0 = a.grad_entropy ? -(g + h * a.entropy[r]) * inv_t : -g * inv_t;
    if (a.grad_entropy) {
      backward_row<scalar_t, true>(z, dz, a.vocab, label, inv_t, a.lse[r], coef0, -h * inv_t, g * inv_t);
    } else {
      backward_row<scalar_t, false>(z, dz, a.vocab, label, inv_t, a.lse[r], coef0, acc(0), g * inv_t);
    }
  }
}

// Constant-initialised (function addresses only): no static initialiser runs ISA-specific code.
constexpr KernelTable make_table(const char* isa) {
  return KernelTable{isa,
                     &forward_rows<float>,
                     &forward_rows<double>,
                     &forward_rows<c10::BFloat16>,
                     &forward_rows<c10::Half>,
                     &backward_rows<float>,
                     &backward_rows<double>,
                     &backward_rows<c10::BFloat16>,
                     &backward_rows<c10::Half>};
}

}  // namespace
}  // namespace rlhf_ext::logprobs_cpu
