// Row kernel of the CPU sampler (csrc/cpu/sampling.cpp): the filters and the draw on one row of logits, over the
// vectorised passes of csrc/cpu/sampling_rows.h (`simd`, this CPU's ISA). Included by sampling.cpp only;
// internal linkage throughout. See sampling.cpp for the algorithm and the kept-set rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "sampling_kernels.h"

namespace rlhf_ext {
namespace sampling_cpu {
namespace {

struct Candidate {
  float z;
  float w;
  int32_t index;
};

struct RowSettings {
  bool greedy;  // temperature == 0 exactly
  float temperature;
  int64_t top_k;
  double top_p;
  float min_p;
};

struct RowResult {
  int64_t token = -1;
  float logprob = 0, filtered_logprob = 0;
  int status = 0;  // 0 ok, 1 NaN, 2 +inf, 3 no finite logit
};

struct Scratch {
  std::vector<float> z, block_max, values, w;  // w: only for the histogram fallback
  std::vector<int32_t> bin;
  std::vector<double> block_sum;
  std::vector<Candidate> cand, blocks;
  explicit Scratch(int64_t V) : z(V), block_max((V + kBlock - 1) / kBlock), block_sum(block_max.size()) {}
};

// Largest value v among c[0..n).z with sum{w : z >= v} >= target (the top-p threshold). Reorders c.
// A weighted quickselect: 3-way partition around a median-of-three pivot, recurse into the side holding the
// crossing; small ranges (or adversarial inputs after 64 rounds) are sorted instead. If the whole mass falls
// short of the target (rounding), returns -inf (keep everything).
float weighted_threshold(Candidate* c, int64_t n, double target) {
  int64_t lo = 0, hi = n;
  double above = 0;  // mass of candidates known to lie strictly above [lo, hi)
  for (int round = 0; lo < hi; ++round) {
    if (hi - lo <= 32 || round > 64) {
      std::sort(c + lo, c + hi, [](const Candidate& a, const Candidate& b) { return a.z > b.z; });
      for (int64_t i = lo; i < hi;) {
        int64_t j = i;
        double group = 0;
        for (; j < hi && c[j].z == c[i].z; ++j) group += c[j].w;
        if (above + group >= target) return c[i].z;
        above += group;
        i = j;
      }
      break;
    }
    float a = c[lo].z, b = c[lo + (hi - lo) / 2].z, d = c[hi - 1].z;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), d));
    int64_t gt = lo, i = lo, lt = hi;  // [lo, gt) > pivot, [gt, i) == pivot, [lt, hi) < pivot
    while (i < lt) {
      if (c[i].z > pivot) std::swap(c[i++], c[gt++]);
      else if (c[i].z < pivot) std::swap(c[i], c[--lt]);
      else ++i;
    }
    double mass_gt = 0, mass_eq = 0;
    for (int64_t j = lo; j < gt; ++j) mass_gt += c[j].w;
    for (int64_t j = gt; j < lt; ++j) mass_eq += c[j].w;
    if (above + mass_gt >= target) {
      hi = gt;
    } else if (above + mass_gt + mass_eq >= target) {
      return pivot;
    } else {
      above += mass_gt + mass_eq;
      lo = lt;
    }
  }
  return -std::numeric_limits<float>::infinity();
}

template <typename Keep>
void compact(std::vector<Candidate>& cand, Keep keep) {
  cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const Candidate& c) { return !keep(c); }), cand.end());
}

// The first filter's threshold when block maxima give no bound: a histogram of d = m - z (monotone in z) finds
// the bin where the cumulative count reaches k (by_mass false) or the mass reaches target; tokens in lower
// bins are all kept, and an exact select among that one bin's tokens gives the threshold.
float histogram_threshold(const float* z, int64_t V, float m, bool by_mass, double target, Scratch& buf,
                          const SimdPasses& simd) {
  buf.w.resize(V);
  buf.bin.resize(V);
  simd.weights_and_bins(z, V, m, buf.w.data(), buf.bin.data());
  std::vector<int64_t> count(kBins, 0);
  std::vector<double> mass(kBins, 0.0);
  for (int64_t i = 0; i < V; ++i) {
    count[buf.bin[i]] += 1;
    mass[buf.bin[i]] += buf.w[i];
  }
  int crossing = -1;
  int64_t count_above = 0;
  double mass_above = 0;
  for (int b = 0; b < kBins; ++b) {
    if ((by_mass ? mass_above + mass[b] : static_cast<double>(count_above + count[b])) >= target) {
      crossing = b;
      break;
    }
    count_above += count[b];
    mass_above += mass[b];
  }
  if (crossing < 0) return -std::numeric_limits<float>::infinity();  // short of the target by rounding: keep all
  auto& cand = buf.cand;
  cand.clear();
  for (int64_t i = 0; i < V; ++i) {
    if (buf.bin[i] == crossing) cand.push_back({z[i], buf.w[i], static_cast<int32_t>(i)});
  }
  if (by_mass) {
    const float tau = weighted_threshold(cand.data(), static_cast<int64_t>(cand.size()), target - mass_above);
    if (tau > -std::numeric_limits<float>::infinity()) return tau;
    float lowest = std::numeric_limits<float>::infinity();  // short of the target by rounding: keep the bin
    for (const auto& c : cand) lowest = std::min(lowest, c.z);
    return lowest;
  }
  auto& values = buf.values;
  values.resize(cand.size());
  for (size_t i = 0; i < cand.size(); ++i) values[i] = cand[i].z;
  const int64_t rank = static_cast<int64_t>(target) - count_above;  // 1-based rank inside the crossing bin
  std::nth_element(values.begin(), values.begin() + (rank - 1), values.end(), std::greater<float>());
  return values[rank - 1];
}

// A value L with every kept token's z >= L, from block maxima (cheap, usually tight), or -inf.
float candidate_bound(const RowSettings& s, bool k_on, bool p_on, float m, double S, Scratch& buf) {
  const int64_t num_blocks = static_cast<int64_t>(buf.block_max.size());
  const float none = -std::numeric_limits<float>::infinity();
  if (k_on) {
    // At least k tokens (the maxima of the k highest blocks) are >= the k-th largest block maximum.
    if (s.top_k > num_blocks) return none;
    auto& values = buf.values;
    values.assign(buf.block_max.begin(), buf.block_max.end());
    std::nth_element(values.begin(), values.begin() + (s.top_k - 1), values.end(), std::greater<float>());
    return values[s.top_k - 1];
  }
  if (p_on) {
    // The block maxima alone carry mass >= top_p * S above this value, so the top-p threshold is not below it.
    auto& blocks = buf.blocks;
    blocks.resize(num_blocks);
    for (int64_t b = 0; b < num_blocks; ++b) {
      blocks[b] = {buf.block_max[b], exp_nonpositive(buf.block_max[b] - m), static_cast<int32_t>(b)};
    }
    return weighted_threshold(blocks.data(), num_blocks, s.top_p * S);
  }
  // min-p: exp(z - m) >= min_p needs z >= m + log(min_p), less a margin for the rounding of z - m and exp.
  const double log_min_p = std::log(static_cast<double>(s.min_p));
  return static_cast<float>(m + log_min_p - 1e-3 * (1.0 + std::fabs(log_min_p)));
}

// Inverse CDF over per-block kept sums: the block where the running sum passes u * total, then a scan of that
// block with keep(i, w). The target lies in [0, total), so a token with no mass (a -inf logit, or one the
// filters remove) has an empty interval and is never chosen; if the scan's rounding differs from the block
// sum's, the block's last kept token with mass is taken.
template <typename Keep>
int64_t draw_from_blocks(const float* z, int64_t V, float m, const double* block_sum, double total, double u,
                         Keep keep) {
  const int64_t num_blocks = (V + kBlock - 1) / kBlock;
  const double target = u * total;
  double acc = 0;
  int64_t blk = 0;
  for (; blk < num_blocks - 1 && acc + block_sum[blk] <= target; ++blk) acc += block_sum[blk];
  while (block_sum[blk] == 0) acc -= block_sum[--blk];  // a massless last block: step back
  const int64_t begin = blk * kBlock, end = std::min(V, begin + kBlock);
  int64_t last_kept = -1;
  for (int64_t i = begin; i < end; ++i) {
    const float w = exp_nonpositive(z[i] - m);
    if (w <= 0 || !keep(i, w)) continue;
    last_kept = i;
    acc += w;
    if (acc > target) return i;
  }
  if (last_kept >= 0) return last_kept;
  // The block sums come from the vectorised clone, which may round exp differently (FMA contraction) than this
  // scan; if that flips every kept token of the block at a min-p boundary, take the first kept token of the row
  // (the max always is one: exp(0) == 1 >= min_p).
  for (int64_t i = 0;; ++i) {
    const float w = exp_nonpositive(z[i] - m);
    if (w > 0 && keep(i, w)) return i;
  }
}

template <typename scalar_t>
RowResult sample_row(const scalar_t* x, int64_t V, const RowSettings& s, uint64_t seed, int64_t row, Scratch& buf,
                     const SimdPasses& simd) {
  RowResult out;
  const float t = s.greedy ? 1.0f : s.temperature;
  float* z = buf.z.data();
  const float* src;
  if constexpr (std::is_same_v<scalar_t, float>) {
    src = x;
  } else {
    for (int64_t i = 0; i < V; ++i) z[i] = static_cast<float>(x[i]);
    src = z;
  }
  bool nan = false;
  const float m = simd.temper_and_block_max(src, z, V, t, buf.block_max.data(), &nan);
  if (nan) return out.status = 1, out;
  if (m == std::numeric_limits<float>::infinity()) return out.status = 2, out;
  if (m == -std::numeric_limits<float>::infinity()) return out.status = 3, out;
  const double S = simd.exp_block_sums(z, V, m, buf.block_sum.data());
  const double log_S = std::log(S);
  const int64_t num_blocks = static_cast<int64_t>(buf.block_max.size());

  if (s.greedy) {
    int64_t blk = 0;
    while (buf.block_max[blk] != m) ++blk;
    int64_t best = blk * kBlock;
    while (z[best] != m) ++best;  // first index of the max, as torch.argmax
    out.token = best;
    out.logprob = static_cast<float>(-log_S);
    return out;
  }

  const double u = static_cast<double>(philox_first_word(seed, static_cast<uint64_t>(row))) * 0x1p-32;  // [0, 1)
  const bool k_on = s.top_k > 0 && s.top_k < V;
  const bool p_on = s.top_p < 1.0;
  const bool minp_on = s.min_p > 0.0f;
  if (!k_on && !p_on && !minp_on) {
    // Inverse CDF over the whole row (the block sums locate the block, then one block is scanned).
    const int64_t token = draw_from_blocks(z, V, m, buf.block_sum.data(), S, u, [](int64_t, float) { return true; });
    out.token = token;
    out.logprob = out.filtered_logprob = static_cast<float>(static_cast<double>(z[token] - m) - log_S);
    return out;
  }

  // The kept set is {z >= tau} (and w >= min_p). Where a cheap bound exists, the candidates above it are gathered
  // (visiting only blocks whose max reaches it) and the filters run exactly on that list, from which the token is
  // then drawn; otherwise the threshold comes from the histogram and the draw makes one masked pass over the row.
  auto& cand = buf.cand;
  auto gather_above = [&](float bound) {
    cand.clear();
    for (int64_t blk = 0; blk < num_blocks; ++blk) {
      if (buf.block_max[blk] < bound) continue;
      const int64_t begin = blk * kBlock, end = std::min(V, begin + kBlock);
      for (int64_t i = begin; i < end; ++i) {
        if (z[i] >= bound) cand.push_back({z[i], exp_nonpositive(z[i] - m), static_cast<int32_t>(i)});
      }
    }
  };
  const float bound = candidate_bound(s, k_on, p_on, m, S, buf);
  const bool bounded = bound > -std::numeric_limits<float>::infinity();
  if (k_on) {
    float tau_k;
    if (bounded) {
      gather_above(bound);
      auto& values = buf.values;
      values.resize(cand.size());
      for (size_t i = 0; i < cand.size(); ++i) values[i] = cand[i].z;
      std::nth_element(values.begin(), values.begin() + (s.top_k - 1), values.end(), std::greater<float>());
      tau_k = values[s.top_k - 1];
      compact(cand, [&](const Candidate& c) { return c.z >= tau_k; });
    } else {
      tau_k = histogram_threshold(z, V, m, false, static_cast<double>(s.top_k), buf, simd);
      gather_above(tau_k);
    }
    double kept_mass = 0;  // mass(K): the top-p renormalisation
    for (const auto& c : cand) kept_mass += c.w;
    if (p_on) {
      const float tau_p = weighted_threshold(cand.data(), static_cast<int64_t>(cand.size()), s.top_p * kept_mass);
      compact(cand, [&](const Candidate& c) { return c.z >= tau_p; });
    }
  } else if (p_on && bounded) {
    gather_above(bound);
    const float tau_p = weighted_threshold(cand.data(), static_cast<int64_t>(cand.size()), s.top_p * S);
    compact(cand, [&](const Candidate& c) { return c.z >= tau_p; });
  } else if (p_on) {
    const float tau_p = histogram_threshold(z, V, m, true, s.top_p * S, buf, simd);
    const double kept = simd.kept_block_sums(z, V, m, tau_p, s.min_p, buf.block_sum.data());
    const auto keep = [&](int64_t i, float w) { return z[i] >= tau_p && w >= s.min_p; };
    const int64_t token = draw_from_blocks(z, V, m, buf.block_sum.data(), kept, u, keep);
    out.token = token;
    out.logprob = static_cast<float>(static_cast<double>(z[token] - m) - log_S);
    out.filtered_logprob = static_cast<float>(static_cast<double>(z[token] - m) - std::log(kept));
    return out;
  } else {
    gather_above(bound);  // min-p only
  }
  if (minp_on) compact(cand, [&](const Candidate& c) { return c.w >= s.min_p; });

  double final_mass = 0;
  for (const auto& c : cand) final_mass += c.w;
  const double target = u * final_mass;
  double acc = 0;
  size_t pick = cand.size();
  size_t last_positive = 0;
  for (size_t i = 0; i < cand.size(); ++i) {
    if (cand[i].w > 0) last_positive = i;
    acc += cand[i].w;
    if (acc > target) {
      pick = i;
      break;
    }
  }
  if (pick == cand.size()) pick = last_positive;
  const Candidate& chosen = cand[pick];
  out.token = chosen.index;
  out.logprob = static_cast<float>(static_cast<double>(chosen.z - m) - log_S);
  out.filtered_logprob = static_cast<float>(std::log(static_cast<double>(chosen.w)) - std::log(final_mass));
  return out;
}

}  // namespace
}  // namespace sampling_cpu
}  // namespace rlhf_ext
