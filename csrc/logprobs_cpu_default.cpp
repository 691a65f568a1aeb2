// gather_logprobs CPU row kernels for the baseline ISA (at::vec's generic Vectorized, or NEON/VSX
// where torch provides them): the fallback when neither AVX2 nor AVX-512 kernels can run.
#define CPU_CAPABILITY DEFAULT
#include "logprobs_cpu_kernels.h"

namespace rlhf_ext::logprobs_cpu {

const KernelTable* kernels_default() {
  static constexpr KernelTable table = make_table("DEFAULT");
  return &table;
}

}  // namespace rlhf_ext::logprobs_cpu
