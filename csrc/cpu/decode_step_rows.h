// The decode step's vectorised loops between its products, compiled once per ISA: csrc/cpu/decode_step.cpp
// includes this file through csrc/cpu/per_isa.h, each time with RLHF_EXT_ISA (a namespace name) and
// RLHF_EXT_TARGET (a g++ `target` attribute, or nothing) defined. NO include guard.
#if !defined(RLHF_EXT_ISA) || !defined(RLHF_EXT_TARGET)
#error "include decode_step_rows.h through per_isa.h"
#endif

#include <cstdint>

#include "decode_step_kernels.h"

namespace rlhf_ext {
namespace decode_cpu {
namespace RLHF_EXT_ISA {
namespace {

RLHF_EXT_TARGET float dot(const float* a, const float* b, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
RLHF_EXT_TARGET void axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

RLHF_EXT_TARGET float sum_squares(const float* x, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

// y = w * (x * inv)
RLHF_EXT_TARGET void scale_by_weight(const float* x, const float* w, float inv, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// p[i] = exp(p[i] - m) (0 for p[i] = -inf); returns their sum. m >= every p[i].
RLHF_EXT_TARGET float exp_and_sum(float* p, float m, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    p[i] = exp_nonpositive(p[i] - m);
    s += p[i];
  }
  return s;
}

constexpr DecodeLoops kLoops{&dot, &axpy, &sum_squares, &scale_by_weight, &exp_and_sum};

}  // namespace
}  // namespace RLHF_EXT_ISA
}  // namespace decode_cpu
}  // namespace rlhf_ext
