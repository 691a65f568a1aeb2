// The CPU sampler's vectorised passes over a row, compiled once per ISA: csrc/cpu/sampling.cpp includes this
// file through csrc/cpu/per_isa.h, each time with RLHF_EXT_ISA (a namespace name) and RLHF_EXT_TARGET (a g++
// `target` attribute, or nothing) defined. NO include guard.
#if !defined(RLHF_EXT_ISA) || !defined(RLHF_EXT_TARGET)
#error "include sampling_rows.h through per_isa.h"
#endif

#include <cmath>
#include <limits>

#include "sampling_kernels.h"

namespace rlhf_ext {
namespace sampling_cpu {
namespace RLHF_EXT_ISA {
namespace {

// Pass 1: z = src / t (src may alias z), per-block maxima; returns the row max and sets *has_nan.
RLHF_EXT_TARGET float temper_and_block_max(const float* src, float* z, int64_t n, float t, float* block_max,
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

// Sum of w[0..len) in index order: the block sums' bits are those of a scalar loop, whatever the ISA (the draw
// compares running sums against u * S, so a reordered sum could move a token boundary).
RLHF_EXT_TARGET float sum_in_order(const float* w, int64_t len) {
  float s = 0;
  for (int64_t j = 0; j < len; ++j) s += w[j];
  return s;
}

// Pass 2: block_sum[b] = sum of exp(z - m) over block b; returns the row total S (double). The exps of a block
// are computed vectorised into w, then summed in index order.
RLHF_EXT_TARGET double exp_block_sums(const float* z, int64_t n, float m, double* block_sum) {
  double total = 0;
  float w[kBlock];
  for (int64_t start = 0, blk = 0; start < n; start += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - start);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) w[j] = exp_nonpositive(z[start + j] - m);
    const float s = sum_in_order(w, len);
    block_sum[blk] = s;
    total += s;
  }
  return total;
}

RLHF_EXT_TARGET void weights_and_bins(const float* z, int64_t n, float m, float* w, int32_t* bin) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    w[i] = exp_nonpositive(z[i] - m);
    const float d = (m - z[i]) * 16.0f;  // +inf for -inf logits
    bin[i] = static_cast<int32_t>(d < static_cast<float>(kBins - 1) ? d : static_cast<float>(kBins - 1));
  }
}

// Per-block sums of exp(z - m) over the kept tokens (z >= tau and exp(z - m) >= min_p); returns the total.
RLHF_EXT_TARGET double kept_block_sums(const float* z, int64_t n, float m, float tau, float min_p,
                                      double* block_sum) {
  double total = 0;
  float kept[kBlock];
  for (int64_t start = 0, blk = 0; start < n; start += kBlock, ++blk) {
    const int64_t len = std::min(kBlock, n - start);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float w = exp_nonpositive(z[start + j] - m);
      kept[j] = (z[start + j] >= tau && w >= min_p) ? w : 0.0f;
    }
    const float s = sum_in_order(kept, len);
    block_sum[blk] = s;
    total += s;
  }
  return total;
}

constexpr SimdPasses kPasses{&temper_and_block_max, &exp_block_sums, &weights_and_bins, &kept_block_sums};

}  // namespace
}  // namespace RLHF_EXT_ISA
}  // namespace sampling_cpu
}  // namespace rlhf_ext
