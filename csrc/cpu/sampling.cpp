// Fused sampler on CPU: temperature, top-k, top-p, min-p and the draw in one kernel, parallel over rows,
// with no sort of the vocabulary.
//
// Per row (z = logits / T in float32, m = max z, w_i = exp(z_i - m), S = sum w), rows split across threads:
//   pass 1  z, per-block maxima (blocks of 64 tokens), m, NaN / +inf detection;
//   pass 2  per-block sums of w and S (double). w is never stored: it is recomputed where needed;
//   bound   from the block maxima alone, a value L below which no kept token lies: the k-th largest block max
//           (k blocks hold a token >= it), or the block max where the block maxima's own mass reaches
//           top_p * S, or m + log(min_p) less a rounding margin; when no bound applies L = -inf;
//   gather  the candidates z >= L, visiting only blocks whose max is >= L (usually a few percent of the row);
//   exact   top-k by nth_element on the candidates' values, top-p by a weighted quickselect (3-way pivot
//           partition) on what top-k kept, min-p as a predicate;
//   draw    inverse CDF on the kept mass (without filters: the block sums locate the block, then one block is
//           scanned) with one uniform from Philox4x32-10 keyed by the seed drawn from the torch.Generator,
//           counter = row, so the result does not depend on the thread count.
// No pass sorts the vocabulary; the only full-row work is two vectorised passes (csrc/cpu/sampling_rows.h,
// compiled per ISA and picked by cpu_isa(); csrc/cpu/isa.h).
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

#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "../checks/checks.h"
#include "../kernels.h"
#include "isa.h"
#include "sampling_kernels.h"

// The passes' bits were fixed with these flags (AVX2 without FMA contraction; AVX-512F alone), so they stay.
#define RLHF_EXT_AVX2_FLAGS "avx2"
#define RLHF_EXT_AVX512_FLAGS "avx512f"
#define RLHF_EXT_ISA_ROWS "sampling_rows.h"
#include "per_isa.h"

#include "sampling_filters.h"

namespace rlhf_ext {

namespace {

// sampling_cpu is opened per function, not for the whole namespace: a unity build of every csrc/ file (the
// C++17 check of tests/test_install.py) would otherwise see its kBlock beside whiten.cpp's.
const sampling_cpu::SimdPasses& simd_passes() {
  using namespace sampling_cpu;
#ifdef RLHF_EXT_X86_ISAS
  static const SimdPasses passes =
      cpu::for_isa(cpu::cpu_isa(), isa_default::kPasses, isa_avx2::kPasses, isa_avx512::kPasses);
#else
  static const SimdPasses passes = isa_default::kPasses;
#endif
  return passes;
}

// Per-row settings as host vectors; a missing tensor repeats the scalar.
template <typename T>
std::vector<T> per_row(const c10::optional<at::Tensor>& t, T scalar, int64_t B, at::ScalarType as) {
  if (!t.has_value()) return std::vector<T>(B, scalar);
  auto c = t->to(as).contiguous();
  const T* p = c.template data_ptr<T>();
  return std::vector<T>(p, p + B);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits_in, double temperature, int64_t top_k, double top_p, double min_p,
    const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
    const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p,
    c10::optional<at::Generator> generator) {
  using namespace sampling_cpu;
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
  const SimdPasses& simd = simd_passes();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    // Rows per task: at least ~64k logits, so small batches of small vocabularies are not split to death.
    const int64_t grain = std::max<int64_t>(1, 65536 / V);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      Scratch buf(V);
      for (int64_t b = begin; b < end; ++b) {
        const RowSettings s{temps[b] == 0.0, static_cast<float>(temps[b]), ks[b], ps[b], static_cast<float>(mps[b])};
        const RowResult r = sample_row<scalar_t>(x + b * V, V, s, seed, b, buf, simd);
        tok[b] = r.token;
        lp[b] = r.logprob;
        flp[b] = r.filtered_logprob;
        status[b] = r.status;
      }
    });
  });
  for (int64_t b = 0; b < B; ++b) {
    if (status[b] == 1 || status[b] == 2) {
      // logits / temperature is NaN or +inf. If the row itself holds neither, the temperature is to blame: so
      // small that the division overflows float32 (or, below float32's smallest value, divides by 0).
      const auto row = logits_in[b];
      const bool row_is_finite = !(row.isnan() | row.isposinf()).any().item<bool>();
      TORCH_CHECK(!row_is_finite, "temperature: expected 0 (greedy) or a value large enough that logits / temperature ",
                  "is finite in float32, got ", temps[b], " in row ", b);
    }
    TORCH_CHECK(status[b] != 1, "logits: row ", b, " contains NaN (after dividing by temperature ", temps[b], ")");
    TORCH_CHECK(status[b] != 2, "logits: row ", b, " contains +inf (after dividing by temperature ", temps[b],
                "); expected finite logits or -inf for banned tokens");
    TORCH_CHECK(status[b] != 3, "logits: row ", b, " has no finite logit (every token is -inf); nothing can be sampled");
  }
  return {tokens, logprobs, filtered};
}

}  // namespace rlhf_ext
