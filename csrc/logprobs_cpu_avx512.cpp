// gather_logprobs CPU row kernels compiled for AVX-512 (F, BW, VL, DQ) + FMA (used when
// at::get_cpu_capability() says AVX512). Same scheme as csrc/logprobs_cpu_avx2.cpp.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#define RLHF_EXT_UNDEF__AVX512F__
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
#ifdef RLHF_EXT_UNDEF__AVX512F__
#undef __AVX512F__
#undef RLHF_EXT_UNDEF__AVX512F__
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "logprobs_cpu_kernels.h"

namespace rlhf_ext::logprobs_cpu {
namespace {
constexpr KernelTable kTable = make_table("AVX512");  // data only: built at compile time
}  // namespace
}  // namespace rlhf_ext::logprobs_cpu
#pragma GCC pop_options

namespace rlhf_ext::logprobs_cpu {
// Compiled for the baseline ISA: callers on any CPU may ask whether these kernels exist.
const KernelTable* kernels_avx512() { return &kTable; }
}  // namespace rlhf_ext::logprobs_cpu

#else
namespace rlhf_ext::logprobs_cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace rlhf_ext::logprobs_cpu
#endif
