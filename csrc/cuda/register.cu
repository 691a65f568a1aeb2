// The CUDA registration table: every op of csrc/ops.cpp's schemas bound to its CUDA kernel, <op>_cuda
// (declared in csrc/kernels.h). One line per op: tests/test_csrc_layout.py checks that none is missing.
#include <torch/library.h>

#include "../kernels.h"

namespace rlhf_ext {

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("gae", &gae_cuda);
  m.impl("masked_moments", &masked_moments_cuda);
  m.impl("masked_whiten", &masked_whiten_cuda);
  m.impl("logprobs_forward", &logprobs_forward_cuda);
  m.impl("logprobs_backward", &logprobs_backward_cuda);
  m.impl("logprobs_backward_inplace", &logprobs_backward_inplace_cuda);
  m.impl("ppo_loss", &ppo_loss_cuda);
  m.impl("ppo_loss_backward", &ppo_loss_backward_cuda);
  m.impl("kl_penalty", &kl_penalty_cuda);
  m.impl("sample", &sample_cuda);
}

}  // namespace rlhf_ext
