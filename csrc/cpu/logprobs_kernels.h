// Interface between the torch-facing CPU ops (csrc/cpu/logprobs.cpp, compiled for the baseline ISA) and the row
// kernels (csrc/cpu/logprobs_rows.h), which are compiled once per vector ISA (csrc/cpu/logprobs_isa.h) and
// picked at run time by cpu_isa() (csrc/cpu/isa.h). Only plain pointers and sizes cross this boundary: no torch
// objects are built in ISA-specific code.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../maths/acc_type.h"

namespace rlhf_ext::logprobs_cpu {

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* logits;      // row r is logits[row_offsets[r] + j], j in [0, vocab)
  const int64_t* row_offsets;  // [N]
  const int64_t* labels;       // [N], validated: in [0, vocab) or == ignore_index
  acc_t<scalar_t>* logprobs;   // [N] log_softmax(logits / T)[label]
  acc_t<scalar_t>* entropy;    // [N] entropy of softmax(logits / T) (0 when !with_entropy)
  acc_t<scalar_t>* lse;        // [N] logsumexp(logits / T), saved for the backward
  int64_t vocab;
  int64_t ignore_index;
  acc_t<scalar_t> inv_temperature;
  bool with_entropy;
};

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* logits;             // row r at logits + in_offsets[r]
  const int64_t* in_offsets;          // [N]
  scalar_t* grad;                     // row r at grad + out_offsets[r]; may alias logits (in-place)
  const int64_t* out_offsets;         // [N]
  const int64_t* labels;              // [N], validated
  const acc_t<scalar_t>* grad_logprobs;  // [N], or nullptr when no gradient reaches the log-probs
  const acc_t<scalar_t>* grad_entropy;   // [N], or nullptr when no gradient reaches the entropy
  const acc_t<scalar_t>* lse;         // [N] from the forward
  const acc_t<scalar_t>* entropy;     // [N] from the forward (read only when grad_entropy is set)
  int64_t vocab;
  int64_t ignore_index;
  acc_t<scalar_t> inv_temperature;
};

// Process rows [begin, end).
template <typename scalar_t>
using ForwardFn = void (*)(const ForwardArgs<scalar_t>&, int64_t begin, int64_t end);
template <typename scalar_t>
using BackwardFn = void (*)(const BackwardArgs<scalar_t>&, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;
  ForwardFn<float> forward_f32;
  ForwardFn<double> forward_f64;
  ForwardFn<c10::BFloat16> forward_bf16;
  ForwardFn<c10::Half> forward_f16;
  BackwardFn<float> backward_f32;
  BackwardFn<double> backward_f64;
  BackwardFn<c10::BFloat16> backward_bf16;
  BackwardFn<c10::Half> backward_f16;
};

// Each returns nullptr when this build could not compile kernels for that ISA.
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace rlhf_ext::logprobs_cpu
