// The one per-ISA mechanism of the CPU kernels. A kernel whose speed depends on the vector ISA is compiled once
// per ISA (baseline x86-64 or the compiler's default elsewhere, AVX2 + FMA, AVX-512), and cpu_isa() picks the
// widest variant this CPU supports, as at::get_cpu_capability() reports it (so ATEN_CPU_CAPABILITY=default or
// =avx2 lowers it, as it does for torch's own kernels). One wheel is then fast on AVX2/AVX-512 machines and
// still runs elsewhere. Two ways to compile the variants, one per kind of code:
//   - plain C++ loops (`omp simd`, g++'s vectoriser): csrc/cpu/per_isa.h includes the op's row header once per
//     ISA, in namespace RLHF_EXT_ISA, every function carrying RLHF_EXT_TARGET (ppo_loss, sampling);
//   - at::vec::Vectorized kernels, whose types torch selects with the preprocessor (CPU_CAPABILITY): one small
//     translation unit per ISA around csrc/cpu/logprobs_isa.h (logprobs).
// Only plain pointers and sizes cross into ISA-specific code: no torch object is built there.
#pragma once

#include <ATen/Version.h>

#include <string>

// The ISA variants exist where g++ targets x86-64; elsewhere only the baseline is compiled.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_EXT_X86_ISAS 1
#endif

namespace rlhf_ext::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

// Read once per process: at::get_cpu_capability() is the hardware's best, lowered by ATEN_CPU_CAPABILITY.
inline Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef RLHF_EXT_X86_ISAS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
#endif
    return Isa::kDefault;
  }();
  return isa;
}

// The variant of `isa` among the three (the baseline one where the others are not compiled).
template <typename T>
T for_isa(Isa isa, T baseline, T avx2, T avx512) {
  return isa == Isa::kAvx512 ? avx512 : (isa == Isa::kAvx2 ? avx2 : baseline);
}

}  // namespace rlhf_ext::cpu
