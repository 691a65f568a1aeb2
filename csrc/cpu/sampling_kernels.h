// Interface between the CPU sampler's row logic (csrc/cpu/sampling_filters.h, baseline ISA) and its vectorised
// passes over a row (csrc/cpu/sampling_rows.h, compiled per ISA and picked by cpu_isa(); csrc/cpu/isa.h), and
// the scalar maths both use. Included by csrc/cpu/sampling.cpp only; internal linkage throughout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace rlhf_ext {
namespace sampling_cpu {
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

constexpr int64_t kBlock = 64;  // block maxima bound the kept set; block sums locate the inverse-CDF draw
constexpr int kBins = 512;  // histogram fallback: d = m - z in steps of 1/16 over [0, 32); the last bin is open

// exp(x) for x <= 0 (x = z - max), branch-free so that the loops over it in sampling_rows.h vectorise: Cody-Waite
// reduction by ln 2, a degree-6 polynomial on [-ln2/2, ln2/2] (about 1 ulp), scaling by 2^n through the exponent
// bits. Results below FLT_MIN (x < -87.3) flush to 0: such tokens are 1e-38 times less likely than the top one.
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
  // x < -87.3 gives +0 through a bit mask, not `cond ? 0 : p * scale`: g++ (trapping maths, its default) will not
  // evaluate a product that one branch skips, so the ternary kept every loop calling this scalar.
  const float y = p * scale;
  int32_t y_bits;
  std::memcpy(&y_bits, &y, sizeof(y_bits));
  y_bits &= -static_cast<int32_t>(!(x < -87.3f));
  float out;
  std::memcpy(&out, &y_bits, sizeof(out));
  return out;
}

// The vectorised passes of one ISA (csrc/cpu/sampling_rows.h documents each).
struct SimdPasses {
  float (*temper_and_block_max)(const float* src, float* z, int64_t n, float t, float* block_max, bool* has_nan);
  double (*exp_block_sums)(const float* z, int64_t n, float m, double* block_sum);
  void (*weights_and_bins)(const float* z, int64_t n, float m, float* w, int32_t* bin);
  double (*kept_block_sums)(const float* z, int64_t n, float m, float tau, float min_p, double* block_sum);
};

}  // namespace
}  // namespace sampling_cpu
}  // namespace rlhf_ext
