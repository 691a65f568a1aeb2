// Row kernel of the CPU sampler (csrc/sampling.cpp): everything that touches one row of logits. Included by
// sampling.cpp only; internal linkage throughout. See sampling.cpp for the algorithm and the kept-set rule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace rlhf_ext {
namespace {

// ---- Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") ----
inline uint32_t philox_first_word(uint64_t key, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Hot loops are compiled for AVX-512, AVX2 and the baseline ISA and picked at load time (GCC/Clang function
// multi-versioning on x86-64); elsewhere they are plain loops for the compiler's default vectoriser.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define RLHF_EXT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RLHF_EXT_SIMD_CLONES
#endif

constexpr int64_t kBlock = 64;  // block maxima bound the kept set; block sums locate the inverse-CDF draw

// exp(x) for x <= 0 (x = z - max), branch-free so that it vectorises: Cody-Waite reduction by ln 2, a degree-6
// polynomial on [-ln2/2, ln2/2] (about 1 ulp), scaling by 2^n through the exponent bits. Results below
// FLT_MIN (x < -87.3) flush to 0: such tokens are 1e-38 times less likely than the top one.
inline float exp_nonpositive(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float n_clamped = n < -126.0f ? -126.0f : n;
  const int32_t bits = (static_cast<int32_t>(n_clamped) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

// Pass 1: z = src / t (src may alias z), per-block maxima; returns the row max and sets *has_nan.
RLHF_EXT_SIMD_CLONES float temper_and_block_max(const float* src, float* z, int64_t n, float t, float* block_max,
                                                bool* has_nan) {
  float m = -std::numeric_limits<float>::infinity();
  int nan = 0;
  for (int64_t start = 0, blk = 0; start < n; start += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - start);
    float bm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : bm) reduction(| : nan)
    for (int64_t j = 0; j < len; ++j) {
      const float v = src[start + j] / t;
      z[start + j] = v;
      nan |= v != v;
      bm = v > bm ? v : bm;
    }
    block_max[blk] = bm;
    m = bm > m ? bm : m;
  }
  *has_nan = nan != 0;
  return m;
}

// Pass 2: block_sum[b] = sum of exp(z - m) over block b; returns the row total S (double).
RLHF_EXT_SIMD_CLONES double exp_block_sums(const float* z, int64_t n, float m, double* block_sum) {
  double total = 0;
  for (int64_t start = 0, blk = 0; start < n; start += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - start);
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) s += exp_nonpositive(z[start + j] - m);
    block_sum[blk] = s;
    total += s;
  }
  return total;
}

constexpr int kBins = 512;  // histogram fallback: d = m - z in steps of 1/16 over [0, 32); the last bin is open

RLHF_EXT_SIMD_CLONES void weights_and_bins(const float* z, int64_t n, float m, float* w, int32_t* bin) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    w[i] = exp_nonpositive(z[i] - m);
    const float d = (m - z[i]) * 16.0f;  // +inf for -inf logits
    bin[i] = static_cast<int32_t>(d < static_cast<float>(kBins - 1) ? d : static_cast<float>(kBins - 1));
  }
}

// Per-block sums of exp(z - m) over the kept tokens (z >= tau and exp(z - m) >= min_p); returns the total.
RLHF_EXT_SIMD_CLONES double kept_block_sums(const float* z, int64_t n, float m, float tau, float min_p,
                                           double* block_sum) {
  double total = 0;
  for (int64_t start = 0, blk = 0; start < n; start += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - start);
    float s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < len; ++j) {
      const float w = exp_nonpositive(z[start + j] - m);
      s += (z[start + j] >= tau && w >= min_p) ? w : 0.0f;
    }
    block_sum[blk] = s;
    total += s;
  }
  return total;
}

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
float histogram_threshold(const float* z, int64_t V, float m, bool by_mass, double target, Scratch& buf) {
  buf.w.resize(V);
  buf.bin.resize(V);
  weights_and_bins(z, V, m, buf.w.data(), buf.bin.data());
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
RowResult sample_row(const scalar_t* x, int64_t V, const RowSettings& s, uint64_t seed, int64_t row, Scratch& buf) {
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
  const float m = temper_and_block_max(src, z, V, t, buf.block_max.data(), &nan);
  if (nan) return out.status = 1, out;
  if (m == std::numeric_limits<float>::infinity()) return out.status = 2, out;
  if (m == -std::numeric_limits<float>::infinity()) return out.status = 3, out;
  const double S = exp_block_sums(z, V, m, buf.block_sum.data());
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
      tau_k = histogram_threshold(z, V, m, false, static_cast<double>(s.top_k), buf);
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
    const float tau_p = histogram_threshold(z, V, m, true, s.top_p * S, buf);
    const double kept = kept_block_sums(z, V, m, tau_p, s.min_p, buf.block_sum.data());
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
}  // namespace rlhf_ext
