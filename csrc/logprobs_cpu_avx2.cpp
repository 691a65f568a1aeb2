// gather_logprobs CPU row kernels compiled for AVX2 + FMA (used when at::get_cpu_capability() says
// AVX2 or better). The ISA is enabled with a pragma for this file only, after the prelude, so the
// rest of the extension keeps the baseline ISA; see csrc/logprobs_cpu_isa_prelude.h.
// No contraction of a * b - c into an FMA (this ISA has them): the forward and the backward must round
// x = z / T the same way before subtracting lse, or |x| ~ 1e30 leaves a sub-ulp residue of ~1e22 that
// exp() turns into an infinite gradient (or a positive log-prob). Before any include, so every function
// of the file shares one setting and can be inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "logprobs_cpu_isa_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the ISA macros for a target pragma in C++, and sleef.h (torch's vector math)
// declares its wide entry points only under them: define them for that one include.
#ifndef __AVX__
#define __AVX__ 1
#define RLHF_EXT_UNDEF__AVX__
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define RLHF_EXT_UNDEF__AVX2__
#endif
#include <sleef.h>
#ifdef RLHF_EXT_UNDEF__AVX__
#undef __AVX__
#undef RLHF_EXT_UNDEF__AVX__
#endif
#ifdef RLHF_EXT_UNDEF__AVX2__
#undef __AVX2__
#undef RLHF_EXT_UNDEF__AVX2__
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "logprobs_cpu_kernels.h"

namespace rlhf_ext::logprobs_cpu {
namespace {
constexpr KernelTable kTable = make_table("AVX2");  // data only: built at compile time
}  // namespace
}  // namespace rlhf_ext::logprobs_cpu
#pragma GCC pop_options

namespace rlhf_ext::logprobs_cpu {
// Compiled for the baseline ISA: callers on any CPU may ask whether these kernels exist.
const KernelTable* kernels_avx2() { return &kTable; }
}  // namespace rlhf_ext::logprobs_cpu

#else
namespace rlhf_ext::logprobs_cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace rlhf_ext::logprobs_cpu
#endif
