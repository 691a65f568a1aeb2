// gather_logprobs CPU row kernels for AVX-512 F/BW/VL/DQ + FMA (used when cpu_isa() says AVX512). The unit is
// csrc/cpu/logprobs_isa.h; the ISA is enabled for this file only, so the rest of the extension keeps the baseline.
#define RLHF_EXT_LOGPROBS_ISA 2
#include "logprobs_isa.h"
