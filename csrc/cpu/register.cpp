// The CPU registration table: every op of csrc/ops.cpp's schemas bound to its CPU kernel, <op>_cpu
// (declared in csrc/kernels.h). One line per op: tests/test_csrc_layout.py checks that none is missing.
#include <torch/library.h>

#include "../kernels.h"

namespace rlhf_ext {

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("masked_moments", &masked_moments_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
  m.impl("logprobs_forward", &logprobs_forward_cpu);
  m.impl("logprobs_backward", &logprobs_backward_cpu);
  m.impl("logprobs_backward_inplace", &logprobs_backward_inplace_cpu);
  m.impl("ppo_loss", &ppo_loss_cpu);
  m.impl("ppo_loss_backward", &ppo_loss_backward_cpu);
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("sample", &sample_cpu);
  m.impl("pack_linear_weight", &pack_linear_weight_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("decode_step", &decode_step_cpu);
}

}  // namespace rlhf_ext
