// Includes the row header named by RLHF_EXT_ISA_ROWS once per ISA (see csrc/cpu/isa.h): in namespace
// isa_default with no target attribute, and on x86-64 g++ also in isa_avx2 and isa_avx512 with RLHF_EXT_TARGET
// set to a g++ `target` attribute. Every function of the row header that holds a vectorised loop carries
// RLHF_EXT_TARGET itself: g++ sizes `omp simd` reductions when it lowers the function that holds the loop, before
// inlining, from that function's own target. The ISA flags are RLHF_EXT_AVX2_FLAGS / RLHF_EXT_AVX512_FLAGS when
// the includer defines them (an op whose results were fixed with other flags keeps them), else the defaults
// below. NO include guard: an op file includes it once, after defining RLHF_EXT_ISA_ROWS.
#ifndef RLHF_EXT_ISA_ROWS
#error "define RLHF_EXT_ISA_ROWS (the row header to compile per ISA) before including per_isa.h"
#endif
#include "isa.h"

#ifndef RLHF_EXT_AVX2_FLAGS
#define RLHF_EXT_AVX2_FLAGS "avx2,fma,f16c"
#endif
#ifndef RLHF_EXT_AVX512_FLAGS
#define RLHF_EXT_AVX512_FLAGS "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#endif

#define RLHF_EXT_ISA isa_default
#define RLHF_EXT_TARGET
#include RLHF_EXT_ISA_ROWS
#undef RLHF_EXT_ISA
#undef RLHF_EXT_TARGET
#ifdef RLHF_EXT_X86_ISAS
#define RLHF_EXT_ISA isa_avx2
#define RLHF_EXT_TARGET __attribute__((target(RLHF_EXT_AVX2_FLAGS)))
#include RLHF_EXT_ISA_ROWS
#undef RLHF_EXT_ISA
#undef RLHF_EXT_TARGET
#define RLHF_EXT_ISA isa_avx512
#define RLHF_EXT_TARGET __attribute__((target(RLHF_EXT_AVX512_FLAGS)))
#include RLHF_EXT_ISA_ROWS
#undef RLHF_EXT_ISA
#undef RLHF_EXT_TARGET
#endif
#undef RLHF_EXT_ISA_ROWS
#undef RLHF_EXT_AVX2_FLAGS
#undef RLHF_EXT_AVX512_FLAGS
