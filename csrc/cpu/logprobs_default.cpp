// gather_logprobs CPU row kernels for the baseline ISA (at::vec's generic Vectorized, or NEON/VSX where torch
// provides them): the fallback when neither AVX2 nor AVX-512 kernels can run. The unit is csrc/cpu/logprobs_isa.h.
#define RLHF_EXT_LOGPROBS_ISA 0
#include "logprobs_isa.h"
