// The whole translation unit of the gather_logprobs CPU row kernels for one ISA (csrc/cpu/isa.h): each of
// csrc/cpu/logprobs_{default,avx2,avx512}.cpp defines RLHF_EXT_LOGPROBS_ISA (0 baseline, 1 AVX2 + FMA, 2 AVX-512
// F/BW/VL/DQ + FMA) and includes this file first. at::vec::Vectorized resolves to the ISA that CPU_CAPABILITY
// names, so the row kernels (csrc/cpu/logprobs_rows.h) become that ISA's code; the unit exports the table
// kernels_<isa>() (nullptr where this build cannot compile the ISA). NO include guard.
#ifndef RLHF_EXT_LOGPROBS_ISA
#error "define RLHF_EXT_LOGPROBS_ISA (0, 1 or 2) before including logprobs_isa.h"
#endif

// No contraction of a * b - c into an FMA (the AVX2 and AVX-512 units have them): the forward and the backward
// must round x = z / T the same way before subtracting lse, or |x| ~ 1e30 leaves a sub-ulp residue of ~1e22 that
// exp() turns into an infinite gradient (or a positive log-prob). Before any include, so every function of the
// unit shares one setting and can be inlined.
#if RLHF_EXT_LOGPROBS_ISA > 0 && defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

// Every header that defines inline functions outside the at::vec::<ISA> namespace is parsed here, for the
// baseline ISA, BEFORE the `#pragma GCC target` below: no AVX-compiled copy of a shared inline function
// (c10::BFloat16 conversions, <cmath>, ...) can then be picked by the linker for code that runs anywhere.
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>

#include "isa.h"
#include "logprobs_kernels.h"

#if RLHF_EXT_LOGPROBS_ISA == 0
#define CPU_CAPABILITY DEFAULT
#include "logprobs_rows.h"

namespace rlhf_ext::logprobs_cpu {
const KernelTable* kernels_default() {
  static constexpr KernelTable table = make_table("DEFAULT");
  return &table;
}
}  // namespace rlhf_ext::logprobs_cpu

#elif defined(RLHF_EXT_X86_ISAS)
#pragma GCC push_options
#if RLHF_EXT_LOGPROBS_ISA == 2
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#else
#pragma GCC target("avx2,fma,f16c")
#endif
// g++ does not define the ISA macros for a target pragma in C++, and sleef.h (torch's vector math) declares
// its wide entry points only under them: define them for that one include.
#ifndef __AVX__
#define __AVX__ 1
#define RLHF_EXT_UNDEF__AVX__
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define RLHF_EXT_UNDEF__AVX2__
#endif
#if RLHF_EXT_LOGPROBS_ISA == 2 && !defined(__AVX512F__)
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
#if RLHF_EXT_LOGPROBS_ISA == 2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#else
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include "logprobs_rows.h"

namespace rlhf_ext::logprobs_cpu {
namespace {
constexpr KernelTable kTable = make_table(RLHF_EXT_LOGPROBS_ISA == 2 ? "AVX512" : "AVX2");  // data only
}  // namespace
}  // namespace rlhf_ext::logprobs_cpu
#pragma GCC pop_options

// Compiled for the baseline ISA: callers on any CPU may ask whether these kernels exist.
namespace rlhf_ext::logprobs_cpu {
#if RLHF_EXT_LOGPROBS_ISA == 2
const KernelTable* kernels_avx512() { return &kTable; }
#else
const KernelTable* kernels_avx2() { return &kTable; }
#endif
}  // namespace rlhf_ext::logprobs_cpu

#else
namespace rlhf_ext::logprobs_cpu {
#if RLHF_EXT_LOGPROBS_ISA == 2
const KernelTable* kernels_avx512() { return nullptr; }
#else
const KernelTable* kernels_avx2() { return nullptr; }
#endif
}  // namespace rlhf_ext::logprobs_cpu
#endif
