// Fused PPO / GRPO loss on CPU: one forward and one backward kernel over [B, T] tokens.
//
// Forward: rows are cut into fixed blocks (a function of T only, never of the thread count); blocks run
// in parallel, each walks its rows in order and keeps double partial sums; the blocks are merged in
// index order. So the result has the same bits whatever at::get_num_threads() is. Within a row the
// token loop is an `omp simd` reduction over the per-token maths of csrc/maths/ppo_loss.h (the CUDA
// kernels use the same functions), done in float32 (float64 for float64 inputs) whatever the input dtype.
// Backward: recomputes the per-token quantities (cheaper than storing them) and writes the gradients
// wrt logprobs, values and entropy in one pass per row.
//
// Vectorisation: the token loops are plain C++ that g++ vectorises. The row kernels (csrc/cpu/ppo_loss_rows.h)
// are compiled per ISA through csrc/cpu/per_isa.h and cpu_isa() picks one (csrc/cpu/isa.h). They differ only in
// how many partial sums a row's `omp simd` reduction keeps (the vector width), so they agree to rounding; on one
// machine the result is bit-identical run to run and across thread counts.

// g++ if-converts the selects of the token loops (and so vectorises them) only when comparisons may
// not trap; torch itself is built with -fno-trapping-math. Set before any include, so every function
// of this file, torch's inline helpers too, shares one optimisation setting and can be inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../checks/checks.h"
#include "../kernels.h"
#include "isa.h"
#include "ppo_loss_kernels.h"

#define RLHF_EXT_ISA_ROWS "ppo_loss_rows.h"
#include "per_isa.h"

namespace rlhf_ext {

namespace {

using ppo_cpu::GradScales;
using ppo_cpu::kTokensPerBlock;
using ppo_cpu::kTokensPerTask;
using ppo_cpu::TokenPtrs;

template <typename scalar_t, int kKl, typename acc_t = at::opmath_type<scalar_t>>
struct RowKernels {
  void (*forward)(const TokenPtrs<scalar_t>&, int64_t, int64_t, int64_t, const ppo::Params&, double*);
  void (*backward)(const TokenPtrs<scalar_t>&, int64_t, int64_t, int64_t, const ppo::Params&, const GradScales&);
  void (*kl_penalty)(const scalar_t*, const scalar_t*, int64_t, acc_t, acc_t*);
};

template <typename scalar_t, int kKl>
RowKernels<scalar_t, kKl> row_kernels() {
  using Kernels = RowKernels<scalar_t, kKl>;
#ifdef RLHF_EXT_X86_ISAS
  const Kernels avx2{&ppo_cpu::isa_avx2::forward_rows<scalar_t, kKl>, &ppo_cpu::isa_avx2::backward_rows<scalar_t, kKl>,
                     &ppo_cpu::isa_avx2::kl_penalty_span<scalar_t, kKl>};
  const Kernels avx512{&ppo_cpu::isa_avx512::forward_rows<scalar_t, kKl>,
                       &ppo_cpu::isa_avx512::backward_rows<scalar_t, kKl>,
                       &ppo_cpu::isa_avx512::kl_penalty_span<scalar_t, kKl>};
#endif
  const Kernels baseline{&ppo_cpu::isa_default::forward_rows<scalar_t, kKl>,
                         &ppo_cpu::isa_default::backward_rows<scalar_t, kKl>,
                         &ppo_cpu::isa_default::kl_penalty_span<scalar_t, kKl>};
#ifdef RLHF_EXT_X86_ISAS
  return cpu::for_isa(cpu::cpu_isa(), baseline, avx2, avx512);
#else
  return baseline;
#endif
}

template <typename F>
void dispatch_kl(int estimator, F&& f) {
  switch (estimator) {
    case ppo::kK1: f(std::integral_constant<int, ppo::kK1>()); break;
    case ppo::kK2: f(std::integral_constant<int, ppo::kK2>()); break;
    case ppo::kK3: f(std::integral_constant<int, ppo::kK3>()); break;
    default: f(std::integral_constant<int, ppo::kNoKl>()); break;
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename scalar_t>
TokenPtrs<scalar_t> token_ptrs(const PpoLossInputs& in) {
  return {ptr_or_null<scalar_t>(in.logprobs), ptr_or_null<scalar_t>(in.old_logprobs),
          ptr_or_null<scalar_t>(in.advantages), ptr_or_null<scalar_t>(in.ref_logprobs),
          ptr_or_null<scalar_t>(in.values), ptr_or_null<scalar_t>(in.old_values),
          ptr_or_null<scalar_t>(in.returns), ptr_or_null<scalar_t>(in.entropy),
          reinterpret_cast<const uint8_t*>(in.mask.data_ptr<bool>()), nullptr, nullptr, nullptr};
}

}  // namespace

at::Tensor ppo_loss_cpu(RLHF_PPO_LOSS_PARAMS) {
  const PpoLossInputs in = prepare_ppo_loss_inputs(RLHF_PPO_LOSS_ARGS);
  const ppo::Params& p = in.params;
  const int64_t B = in.batch, T = in.length;
  const int64_t rows_per_block = std::max<int64_t>(1, kTokensPerBlock / std::max<int64_t>(T, 1));
  const int64_t num_blocks = (B + rows_per_block - 1) / rows_per_block;
  std::vector<std::array<double, ppo::kNumPart>> parts(num_blocks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.compute_dtype, "ppo_loss_cpu", [&] {
    const auto x = token_ptrs<scalar_t>(in);
    dispatch_kl(p.kl_estimator, [&](auto kl_tag) {
      const auto kernels = row_kernels<scalar_t, decltype(kl_tag)::value>();
      const int64_t grain = std::max<int64_t>(1, kTokensPerTask / (rows_per_block * std::max<int64_t>(T, 1)));
      at::parallel_for(0, num_blocks, grain, [&](int64_t block_begin, int64_t block_end) {
        for (int64_t blk = block_begin; blk < block_end; ++blk) {
          parts[blk].fill(0.0);
          kernels.forward(x, blk * rows_per_block, std::min(B, (blk + 1) * rows_per_block), T, p, parts[blk].data());
        }
      });
    });
  });

  std::array<double, ppo::kNumPart> total{};
  for (const auto& part : parts) {
    for (int i = 0; i < ppo::kNumPart; ++i) {
      total[i] = i == ppo::pRatioMax ? std::max(total[i], part[i]) : total[i] + part[i];
    }
  }
  auto out = at::empty({ppo::kNumOut}, in.logprobs.options().dtype(acc_dtype(in.compute_dtype)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ppo_loss_cpu_finalize",
                             [&] { ppo::finalize<scalar_t>(total.data(), p, out.data_ptr<scalar_t>()); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss_backward_cpu(const at::Tensor& grad_out_in,
                                                                     const at::Tensor& out_in, RLHF_PPO_LOSS_PARAMS) {
  const PpoLossInputs in = prepare_ppo_loss_inputs(RLHF_PPO_LOSS_ARGS);
  // Not a structured binding: lambdas capture those only from C++20 on.
  const auto grad_and_out = prepare_ppo_loss_grad(grad_out_in, out_in, in);
  const at::Tensor& grad_out = grad_and_out.first;
  const at::Tensor& out = grad_and_out.second;
  const ppo::Params& p = in.params;
  const int64_t B = in.batch, T = in.length;
  // Upstream gradients of loss, policy_loss, value_loss, kl and entropy (the statistics have none).
  const auto g_out = grad_out.to(at::kDouble);
  const auto out_values = out.to(at::kDouble);
  const double* g = g_out.data_ptr<double>();
  GradScales scales;
  scales.num_tokens = out_values.data_ptr<double>()[ppo::kNumTokens];
  scales.num_seqs = out_values.data_ptr<double>()[ppo::kNumSeqs];
  scales.policy = g[ppo::kLoss] + g[ppo::kPolicyLoss];
  scales.value = g[ppo::kLoss] * p.vf_coef + g[ppo::kValueLoss];
  scales.kl = g[ppo::kLoss] * p.kl_coef + g[ppo::kKl];
  scales.entropy = -g[ppo::kLoss] * p.entropy_coef + g[ppo::kEntropy];

  auto grad_lp = at::empty({B, T}, in.logprobs.options());
  auto grad_v = in.values.defined() ? at::empty({B, T}, in.values.options()) : at::Tensor();
  auto grad_ent = in.entropy.defined() ? at::empty({B, T}, in.entropy.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.compute_dtype, "ppo_loss_backward_cpu", [&] {
    auto x = token_ptrs<scalar_t>(in);
    x.grad_logprobs = grad_lp.data_ptr<scalar_t>();
    x.grad_values = ptr_or_null<scalar_t>(grad_v);
    x.grad_entropy = ptr_or_null<scalar_t>(grad_ent);
    dispatch_kl(p.kl_estimator, [&](auto kl_tag) {
      const auto kernels = row_kernels<scalar_t, decltype(kl_tag)::value>();
      const int64_t grain = std::max<int64_t>(1, kTokensPerTask / std::max<int64_t>(T, 1));
      at::parallel_for(0, B, grain, [&](int64_t row_begin, int64_t row_end) {
        kernels.backward(x, row_begin, row_end, T, p, scales);
      });
    });
  });
  return cast_ppo_loss_grads(grad_lp, grad_v, grad_ent, RLHF_PPO_LOSS_ARGS);
}

at::Tensor kl_penalty_cpu(const at::Tensor& logprobs_in, const at::Tensor& ref_in, std::string_view estimator,
                          double max_log_ratio) {
  const int kl_estimator = parse_kl_estimator(estimator, "estimator");
  const auto inputs = prepare_kl_penalty_inputs(logprobs_in, ref_in, max_log_ratio);
  const at::Tensor& logprobs = inputs.first;
  const at::Tensor& ref_logprobs = inputs.second;
  auto out = at::empty(logprobs.sizes(), logprobs.options().dtype(acc_dtype(logprobs.scalar_type())));
  const int64_t numel = logprobs.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logprobs.scalar_type(), "kl_penalty_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logprobs.data_ptr<scalar_t>();
    const scalar_t* ref = ref_logprobs.data_ptr<scalar_t>();
    acc_t* o = out.data_ptr<acc_t>();
    const acc_t max_lr = static_cast<acc_t>(max_log_ratio);
    dispatch_kl(kl_estimator, [&](auto kl_tag) {
      const auto kernels = row_kernels<scalar_t, decltype(kl_tag)::value>();
      at::parallel_for(0, numel, kTokensPerTask, [&](int64_t begin, int64_t end) {
        kernels.kl_penalty(lp + begin, ref + begin, end - begin, max_lr, o + begin);
      });
    });
  });
  return out;
}

}  // namespace rlhf_ext
