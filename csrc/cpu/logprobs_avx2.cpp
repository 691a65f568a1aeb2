// gather_logprobs CPU row kernels for AVX2 + FMA (used when cpu_isa() says AVX2 or better). The unit is
// csrc/cpu/logprobs_isa.h; the ISA is enabled for this file only, so the rest of the extension keeps the baseline.
#define RLHF_EXT_LOGPROBS_ISA 1
#include "logprobs_isa.h"
