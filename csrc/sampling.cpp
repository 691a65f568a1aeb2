// Fused sampler on CPU: temperature, top-k, top-p, min-p and the draw in one kernel, parallel over rows,
// with no sort of the vocabulary.
//
// Per row (z = logits / T in float32, m = max z, w_i = exp(z_i - m), S = sum w):
//   pass 1  z, m, NaN / +inf detection;
//   pass 2  w, S (double) and, only when a filter is on, a coarse histogram of d = m - z in 1/16 steps
//           (count and mass per bin). d is monotone in z, so the bin where the cumulative count reaches k
//           (or the mass reaches top_p * S, or d reaches -log(min_p)) bounds the kept set from below;
//   pass 3  gathers the candidates in bins up to that bound (a small superset of the kept set);
//   exact   top-k by nth_element on the candidates' values, top-p by a weighted quickselect (3-way pivot
//           partition) on what top-k kept, min-p as a predicate;
//   draw    inverse CDF on the kept mass with one uniform from Philox4x32-10 keyed by the seed drawn from
//           the torch.Generator, counter = row (so it does not depend on the thread count).
//
// Kept-set rule (the reference in rlhf_ext/ops/reference.py implements the same, sort-based):
//   top-k   keep i iff #{j : z_j > z_i} < k               (all tokens tied with the k-th largest stay)
//   top-p   keep i in K iff mass_K{j : z_j > z_i} < top_p * mass(K)   (renormalised on the top-k set K;
//           the smallest high-probability prefix reaching top_p, plus everything tied with its last token)
//   min-p   keep i iff exp(z_i - z_max) >= min_p            (float32, applied after top-p)
// Outputs: the token, log_softmax(z)[token] of the unfiltered tempered distribution, and the log-prob under the
// renormalised filtered distribution. temperature == 0 is greedy: the first argmax of the raw logits, the
// log-prob at T = 1 (log_softmax(logits)[token]) and a filtered log-prob of 0 (a point mass).
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "common.h"

namespace rlhf_ext {

// Shared with csrc/cuda/sampling.cu: shapes, dtypes, devices and the scalar settings.
void check_sample_inputs(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
                         const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
                         const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p) {
  check_dim(logits, 2, "logits", "[B, V]");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "logits: expected a float32/bfloat16/float16 tensor, got ", st);
  TORCH_CHECK(logits.size(1) >= 1, "logits: expected a vocabulary of at least one token, got shape ", shape_str(logits));
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "logits: vocabulary sizes of 2^31 or more are not supported, got ",
              logits.size(1));
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, "temperature: expected a finite value >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "top_k: expected a value >= 0 (0 = off), got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "top_p: expected a value in (0, 1] (1 = off), got ", top_p);
  TORCH_CHECK(min_p >= 0 && min_p <= 1, "min_p: expected a value in [0, 1] (0 = off), got ", min_p);
  const int64_t B = logits.size(0);
  auto check_row = [&](const c10::optional<at::Tensor>& t, const char* name, bool integral) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, name, ": expected a per-row tensor of shape [", B,
                "] (the batch of logits), got shape ", shape_str(*t));
    check_same_device(*t, logits, name, "logits");
    const bool is_int = at::isIntegralType(t->scalar_type(), /*includeBool=*/false);
    TORCH_CHECK(integral ? is_int : at::isFloatingType(t->scalar_type()), name, ": expected ",
                integral ? "an integer" : "a floating-point", " tensor, got ", t->scalar_type());
  };
  check_row(row_temperature, "temperature", false);
  check_row(row_top_k, "top_k", true);
  check_row(row_top_p, "top_p", false);
  check_row(row_min_p, "min_p", false);
}

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

constexpr int kBins = 512;          // histogram of d = m - z over [0, 32) in steps of 1/16; the last bin is open
constexpr float kBinScale = 16.0f;

inline int bin_of(float m, float z) {
  return static_cast<int>(std::min((m - z) * kBinScale, static_cast<float>(kBins - 1)));
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
  std::vector<float> z, w;
  std::vector<Candidate> cand;
  std::vector<float> values;
  std::vector<int64_t> count;
  std::vector<double> mass;
  explicit Scratch(int64_t V) : z(V), w(V), count(kBins), mass(kBins) {}
};

// Largest value v among c[0..n).z with sum{w : z >= v} >= target (the top-p threshold). Reorders c.
// A weighted quickselect: 3-way partition around a median-of-three pivot, recurse into the side holding the
// crossing; small ranges (or adversarial inputs after 64 rounds) are sorted instead.
float weighted_threshold(Candidate* c, int64_t n, double target) {
  int64_t lo = 0, hi = n;
  double above = 0;  // mass of candidates known to lie strictly above [lo, hi)
  float smallest = c[0].z;
  for (int64_t i = 1; i < n; ++i) smallest = std::min(smallest, c[i].z);
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
      return smallest;  // the kept mass falls short of the target only by rounding: keep everything
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
  return smallest;
}

template <typename Keep>
void compact(std::vector<Candidate>& cand, Keep keep) {
  cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const Candidate& c) { return !keep(c); }), cand.end());
}

template <typename scalar_t>
RowResult sample_row(const scalar_t* x, int64_t V, const RowSettings& s, uint64_t seed, int64_t row, Scratch& buf) {
  RowResult out;
  const bool greedy = s.greedy;
  const float t = greedy ? 1.0f : s.temperature;
  float* z = buf.z.data();
  float* w = buf.w.data();
  // Pass 1: tempered logits and their max.
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(x[i]) / t;
    z[i] = v;
    nan |= v != v;
    m = v > m ? v : m;
  }
  if (nan) return out.status = 1, out;
  if (m == std::numeric_limits<float>::infinity()) return out.status = 2, out;
  if (m == -std::numeric_limits<float>::infinity()) return out.status = 3, out;

  const bool k_on = !greedy && s.top_k > 0 && s.top_k < V;
  const bool p_on = !greedy && s.top_p < 1.0;
  const bool minp_on = !greedy && s.min_p > 0.0f;
  const bool filtered = k_on || p_on || minp_on;
  // Pass 2: unnormalised probabilities, their sum and (for the filters) the histogram of m - z.
  double S = 0;
  if (filtered) {
    std::fill(buf.count.begin(), buf.count.end(), 0);
    std::fill(buf.mass.begin(), buf.mass.end(), 0.0);
    for (int64_t i = 0; i < V; ++i) {
      const float e = std::exp(z[i] - m);
      w[i] = e;
      S += e;
      const int bin = bin_of(m, z[i]);
      buf.count[bin] += 1;
      buf.mass[bin] += e;
    }
  } else {
    for (int64_t i = 0; i < V; ++i) {
      const float e = std::exp(z[i] - m);
      w[i] = e;
      S += e;
    }
  }
  const double log_S = std::log(S);

  if (greedy) {
    int64_t best = 0;
    while (z[best] != m) ++best;  // first index of the max, as torch.argmax
    out.token = best;
    out.logprob = static_cast<float>(static_cast<double>(z[best] - m) - log_S);
    return out;
  }

  const double u = static_cast<double>(philox_first_word(seed, static_cast<uint64_t>(row))) * 0x1p-32;  // [0, 1)
  if (!filtered) {
    // Inverse CDF over the whole row: the target lies in [0, S), so a token with w == 0 (a -inf logit) has an
    // empty interval and can never be chosen.
    const double target = u * S;
    double acc = 0;
    int64_t token = -1, last_positive = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (w[i] > 0) last_positive = i;
      acc += w[i];
      if (acc > target) {
        token = i;
        break;
      }
    }
    if (token < 0) token = last_positive;  // acc == S after rounding; only possible at the very top of [0, S)
    out.token = token;
    out.logprob = out.filtered_logprob = static_cast<float>(static_cast<double>(z[token] - m) - log_S);
    return out;
  }

  // Lower bound (as a histogram bin) on the kept set, from the first filter that is on.
  int bound = kBins - 1;
  if (k_on) {
    int64_t cum = 0;
    for (int b = 0; b < kBins; ++b) {
      cum += buf.count[b];
      if (cum >= s.top_k) {
        bound = b;
        break;
      }
    }
  } else if (p_on) {
    const double target = s.top_p * S;
    double cum = 0;
    for (int b = 0; b < kBins; ++b) {
      cum += buf.mass[b];
      if (cum >= target) {
        bound = std::min(b + 1, kBins - 1);  // one bin of slack for the different summation order below
        break;
      }
    }
  } else {
    bound = std::min(bin_of(0.0f, std::log(s.min_p)) + 1, kBins - 1);
  }
  // Pass 3: gather the candidates.
  auto& cand = buf.cand;
  cand.clear();
  for (int64_t i = 0; i < V; ++i) {
    if (bin_of(m, z[i]) <= bound) cand.push_back({z[i], w[i], static_cast<int32_t>(i)});
  }

  double kept_mass = S;  // mass(K): the top-p renormalisation
  if (k_on && static_cast<int64_t>(cand.size()) > s.top_k) {
    auto& values = buf.values;
    values.resize(cand.size());
    for (size_t i = 0; i < cand.size(); ++i) values[i] = cand[i].z;
    std::nth_element(values.begin(), values.begin() + (s.top_k - 1), values.end(), std::greater<float>());
    const float tau_k = values[s.top_k - 1];
    compact(cand, [&](const Candidate& c) { return c.z >= tau_k; });
  }
  if (k_on) {
    kept_mass = 0;
    for (const auto& c : cand) kept_mass += c.w;
  }
  if (p_on) {
    const float tau_p = weighted_threshold(cand.data(), static_cast<int64_t>(cand.size()), s.top_p * kept_mass);
    compact(cand, [&](const Candidate& c) { return c.z >= tau_p; });
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

// Per-row settings as host vectors; a missing tensor repeats the scalar.
template <typename T>
std::vector<T> per_row(const c10::optional<at::Tensor>& t, T scalar, int64_t B, at::ScalarType as) {
  if (!t.has_value()) return std::vector<T>(B, scalar);
  auto c = t->to(as).contiguous();
  const T* p = c.template data_ptr<T>();
  return std::vector<T>(p, p + B);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits_in, double temperature, int64_t top_k, double top_p, double min_p,
    const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
    const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p,
    c10::optional<at::Generator> generator) {
  check_sample_inputs(logits_in, temperature, top_k, top_p, min_p, row_temperature, row_top_k, row_top_p, row_min_p);
  auto logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  auto filtered = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs, filtered};

  const auto temps = per_row<double>(row_temperature, temperature, B, at::kDouble);
  const auto ks = per_row<int64_t>(row_top_k, top_k, B, at::kLong);
  const auto ps = per_row<double>(row_top_p, top_p, B, at::kDouble);
  const auto mps = per_row<double>(row_min_p, min_p, B, at::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(std::isfinite(temps[b]) && temps[b] >= 0, "temperature: expected finite values >= 0, got ", temps[b],
                " in row ", b);
    TORCH_CHECK(ks[b] >= 0, "top_k: expected values >= 0 (0 = off), got ", ks[b], " in row ", b);
    TORCH_CHECK(ps[b] > 0 && ps[b] <= 1, "top_p: expected values in (0, 1] (1 = off), got ", ps[b], " in row ", b);
    TORCH_CHECK(mps[b] >= 0 && mps[b] <= 1, "min_p: expected values in [0, 1] (0 = off), got ", mps[b], " in row ", b);
  }

  uint64_t seed;
  {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }

  std::vector<int> status(B, 0);
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  float* flp = filtered.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch buf(V);
      for (int64_t b = begin; b < end; ++b) {
        const RowSettings s{temps[b] == 0.0, static_cast<float>(temps[b]), ks[b], ps[b], static_cast<float>(mps[b])};
        const RowResult r = sample_row<scalar_t>(x + b * V, V, s, seed, b, buf);
        tok[b] = r.token;
        lp[b] = r.logprob;
        flp[b] = r.filtered_logprob;
        status[b] = r.status;
      }
    });
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(status[b] != 1, "logits: row ", b, " contains NaN (after dividing by temperature ", temps[b], ")");
    TORCH_CHECK(status[b] != 2, "logits: row ", b, " contains +inf (after dividing by temperature ", temps[b],
                "); expected finite logits or -inf for banned tokens");
    TORCH_CHECK(status[b] != 3, "logits: row ", b, " has no finite logit (every token is -inf); nothing can be sampled");
  }
  return {tokens, logprobs, filtered};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace rlhf_ext
