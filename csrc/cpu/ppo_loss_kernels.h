// Types shared by the CPU row kernels of ppo_loss (csrc/cpu/ppo_loss_rows.h, compiled per ISA) and their
// caller (csrc/cpu/ppo_loss.cpp).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../maths/ppo_loss.h"

namespace rlhf_ext {
namespace ppo_cpu {

// Tokens per forward block: large enough to amortise the block bookkeeping, small enough that a
// block's rows stay in L2. The blocks, not the threads, fix the summation order.
constexpr int64_t kTokensPerBlock = 16384;
// Tokens per parallel task (torch's own elementwise grain): smaller calls run on the calling thread,
// since waking the pool costs more than the ~10 ns/token of work, a lot more on a busy machine.
constexpr int64_t kTokensPerTask = 32768;

// Row-major [B, T] data of one call; optional tensors are nullptr when absent.
template <typename scalar_t>
struct TokenPtrs {
  const scalar_t *logprobs, *old_logprobs, *advantages, *ref_logprobs, *values, *old_values, *returns, *entropy;
  const uint8_t* mask;  // torch bool storage (one byte, 0 or 1) read as bytes: g++ vectorises selects on
                        // uint8_t conditions but not on `bool` loads (1-bit precision type)
  scalar_t *grad_logprobs, *grad_values, *grad_entropy;
};

// Backward scalars: token/row counts from the forward output and the upstream gradient of each term.
struct GradScales {
  double num_tokens, num_seqs, policy, value, kl, entropy;
};

}  // namespace ppo_cpu
}  // namespace rlhf_ext
