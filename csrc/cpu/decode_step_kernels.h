// Interface between csrc/cpu/decode_step.cpp and its vectorised loops (csrc/cpu/decode_step_rows.h, compiled per
// ISA and picked by cpu_isa(); csrc/cpu/isa.h). Internal linkage throughout.
#pragma once

#include <cstdint>

#include "sampling_kernels.h"

namespace rlhf_ext {
namespace decode_cpu {
namespace {

using sampling_cpu::exp_nonpositive;  // branch-free exp(x) for x <= 0, ~1 ulp (csrc/cpu/sampling_kernels.h)

// The loops of one ISA (csrc/cpu/decode_step_rows.h documents each).
struct DecodeLoops {
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  float (*sum_squares)(const float* x, int64_t n);
  void (*scale_by_weight)(const float* x, const float* w, float inv, float* y, int64_t n);
  float (*exp_and_sum)(float* p, float m, int64_t n);
};

}  // namespace
}  // namespace decode_cpu
}  // namespace rlhf_ext
