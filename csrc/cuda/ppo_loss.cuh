// Fused PPO / GRPO loss and kl_penalty on CUDA: framework-free kernels and launchers (raw pointers,
// sizes, cudaStream_t). The per-token maths is csrc/maths/ppo_loss.h, shared with the CPU kernels.
//
// Forward: kernel 1 runs one thread block per row (grid-stride over rows, grid = min(B, kMaxBlocks),
// fixed for a shape so the bits do not depend on the GPU model). Each row's loss terms are block-reduced
// (the seq-mean modes need the row total before scaling) and thread 0 adds them, scaled, to the block's
// double accumulators; the statistics stay per thread until one block reduction at the end. Each block
// writes its partials [kNumPart] to a workspace; kernel 2 (one block) merges them in a fixed order and
// writes the output vector. No atomics: the result is bit-identical run to run.
// Backward: one block per row recomputes the token quantities and writes the three gradients; it reads
// the upstream gradient and the token/row counts from device memory (no host sync).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../maths/ppo_loss.h"
#include "common.cuh"

namespace rlhf_ext {
namespace ppo_cuda {

constexpr int kThreads = 256;      // per block, a multiple of 32
constexpr int kMaxBlocks = 1024;   // forward grid cap (rows beyond it are grid-strided)
constexpr int kMaxRowBlocks = 65535;


using cuda::from_acc;
using cuda::to_acc;

// Largest finite value of the storage type, in the accumulation type: gradients saturate there when stored
// (float16: 65504) instead of overflowing to inf, as on CPU (ppo::saturate).
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> max_finite();
template <>
__device__ __forceinline__ float max_finite<float>() { return 3.40282347e38f; }
template <>
__device__ __forceinline__ double max_finite<double>() { return 1.7976931348623157e308; }
template <>
__device__ __forceinline__ float max_finite<__half>() { return 65504.0f; }
template <>
__device__ __forceinline__ float max_finite<__nv_bfloat16>() { return 3.38953139e38f; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t store_grad(acc_t<scalar_t> x) {
  return from_acc<scalar_t>(ppo::saturate(x, max_finite<scalar_t>()));
}

// Row-major [B, T] inputs; optional ones are nullptr when absent.
template <typename scalar_t>
struct TokenArgs {
  const scalar_t *logprobs, *old_logprobs, *advantages, *ref_logprobs, *values, *old_values, *returns, *entropy;
  const bool* mask;
  int64_t batch, length;
};

struct SumOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Reduces N values over the block (fixed shuffle tree, then warp 0 over the warp results): the result
// is valid in thread 0. `shared` holds N x 32 values; every thread of the block must call this.
template <int N, typename T, typename Op>
__device__ __forceinline__ void block_reduce(T (&v)[N], T (*shared)[32], Op op, T identity) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[k] = op(v[k], __shfl_down_sync(0xffffffffu, v[k], offset));
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = lane < num_warps ? shared[k][lane] : identity;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v[k] = op(v[k], __shfl_down_sync(0xffffffffu, v[k], offset));
    }
  }
  __syncthreads();  // `shared` may be reused right after
}

inline int forward_blocks(int64_t batch) {
  return static_cast<int>(batch < 1 ? 1 : (batch < kMaxBlocks ? batch : kMaxBlocks));
}

template <typename scalar_t, int kKl>
__global__ void __launch_bounds__(kThreads)
    ppo_loss_forward_kernel(TokenArgs<scalar_t> x, ppo::Params p, double* __restrict__ partials) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t shared[8][32];
  const acc_t max_lr = p.max_log_ratio, lo = p.ratio_low, hi = p.ratio_high, dual_clip = p.dual_clip;
  const acc_t value_clip = p.cliprange_value;
  // Statistics, per thread over all rows of this block.
  acc_t stats[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // clip, low, high, dual, approxkl, approxkl_k3, ratio, value clip
  acc_t ratio_max[1] = {0};
  double terms[ppo::pSeqs + 1] = {0, 0, 0, 0, 0, 0};  // policy .. seqs (ppo::Part order), thread 0 only
  const int64_t T = x.length;
  for (int64_t b = blockIdx.x; b < x.batch; b += gridDim.x) {
    acc_t row[5] = {0, 0, 0, 0, 0};  // policy, value, kl, entropy, tokens
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const int64_t i = b * T + t;
      if (!x.mask[i]) continue;
      const acc_t logprob = to_acc(x.logprobs[i]);
      const auto tok = ppo::policy_token<acc_t>(logprob, to_acc(x.old_logprobs[i]), to_acc(x.advantages[i]),
                                                max_lr, lo, hi, dual_clip);
      row[0] += tok.loss;
      row[4] += acc_t(1);
      stats[0] += tok.clipped;
      stats[1] += tok.clipped_low;
      stats[2] += tok.clipped_high;
      stats[3] += tok.dual_capped;
      stats[4] += acc_t(0.5) * (tok.log_ratio * tok.log_ratio);
      stats[5] += ppo::k3_terms(tok.log_ratio).k3;
      stats[6] += tok.ratio;
      ratio_max[0] = tok.ratio > ratio_max[0] ? tok.ratio : ratio_max[0];
      if (kKl != ppo::kNoKl) row[2] += ppo::kl_token<kKl, acc_t>(logprob, to_acc(x.ref_logprobs[i]), max_lr).kl;
      if (x.values) {
        const auto v = ppo::value_token<acc_t>(to_acc(x.values[i]), to_acc(x.old_values[i]), to_acc(x.returns[i]),
                                               value_clip);
        row[1] += v.loss;
        stats[7] += v.clipped;
      }
      if (x.entropy) row[3] += to_acc(x.entropy[i]);
    }
    block_reduce<5>(row, shared, SumOp(), acc_t(0));
    if (threadIdx.x == 0 && row[4] > acc_t(0)) {  // an empty row is not a sequence of the seq-mean modes
      const double scale = p.loss_agg == ppo::kSeqMeanTokenMean ? 1.0 / static_cast<double>(row[4]) : 1.0;
      terms[ppo::pPolicy] += static_cast<double>(row[0]) * scale;
      terms[ppo::pValue] += static_cast<double>(row[1]) * scale;
      terms[ppo::pKl] += static_cast<double>(row[2]) * scale;
      terms[ppo::pEntropy] += static_cast<double>(row[3]) * scale;
      terms[ppo::pTokens] += static_cast<double>(row[4]);
      terms[ppo::pSeqs] += 1.0;
    }
  }
  block_reduce<8>(stats, shared, SumOp(), acc_t(0));
  block_reduce<1>(ratio_max, shared, MaxOp(), acc_t(0));
  if (threadIdx.x == 0) {
    double* out = partials + static_cast<int64_t>(blockIdx.x) * ppo::kNumPart;
    out[ppo::pPolicy] = terms[ppo::pPolicy];
    out[ppo::pValue] = terms[ppo::pValue];
    out[ppo::pKl] = terms[ppo::pKl];
    out[ppo::pEntropy] = terms[ppo::pEntropy];
    out[ppo::pTokens] = terms[ppo::pTokens];
    out[ppo::pSeqs] = terms[ppo::pSeqs];
    out[ppo::pClip] = stats[0];
    out[ppo::pClipLow] = stats[1];
    out[ppo::pClipHigh] = stats[2];
    out[ppo::pDual] = stats[3];
    out[ppo::pApproxKl] = stats[4];
    out[ppo::pApproxKlK3] = stats[5];
    out[ppo::pRatio] = stats[6];
    out[ppo::pValueClip] = stats[7];
    out[ppo::pRatioMax] = ratio_max[0];
  }
}

// One block: thread j sums the partials of blocks j, j + kThreads, ... in order, then a fixed tree.
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    ppo_loss_combine_kernel(const double* __restrict__ partials, int num_blocks, ppo::Params p, out_t* out) {
  __shared__ double shared[ppo::kNumPart][32];
  double sums[ppo::kNumPart];
  double ratio_max[1] = {0};
#pragma unroll
  for (int k = 0; k < ppo::kNumPart; ++k) sums[k] = 0;
  for (int blk = threadIdx.x; blk < num_blocks; blk += blockDim.x) {
    const double* part = partials + static_cast<int64_t>(blk) * ppo::kNumPart;
#pragma unroll
    for (int k = 0; k < ppo::kNumPart; ++k) sums[k] += k == ppo::pRatioMax ? 0.0 : part[k];
    ratio_max[0] = part[ppo::pRatioMax] > ratio_max[0] ? part[ppo::pRatioMax] : ratio_max[0];
  }
  block_reduce<ppo::kNumPart>(sums, shared, SumOp(), 0.0);
  block_reduce<1>(ratio_max, shared, MaxOp(), 0.0);
  if (threadIdx.x == 0) {
    sums[ppo::pRatioMax] = ratio_max[0];
    ppo::finalize<out_t>(sums, p, out);
  }
}

template <typename scalar_t, int kKl>
__global__ void __launch_bounds__(kThreads)
    ppo_loss_backward_kernel(TokenArgs<scalar_t> x, ppo::Params p, const acc_t<scalar_t>* grad_out,
                             const acc_t<scalar_t>* out, scalar_t* __restrict__ grad_logprobs,
                             scalar_t* __restrict__ grad_values, scalar_t* __restrict__ grad_entropy) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t shared[1][32];
  __shared__ double row_weight;
  const acc_t max_lr = p.max_log_ratio, lo = p.ratio_low, hi = p.ratio_high, dual_clip = p.dual_clip;
  const acc_t value_clip = p.cliprange_value;
  // Upstream gradients of loss, policy_loss, value_loss, kl, entropy (statistics have none).
  const double g_loss = grad_out[ppo::kLoss];
  const double g_policy = g_loss + grad_out[ppo::kPolicyLoss];
  const double g_value = g_loss * p.vf_coef + grad_out[ppo::kValueLoss];
  const double g_kl = g_loss * p.kl_coef + grad_out[ppo::kKl];
  const double g_entropy = -g_loss * p.entropy_coef + grad_out[ppo::kEntropy];
  const double num_tokens = out[ppo::kNumTokens], num_seqs = out[ppo::kNumSeqs];
  const int64_t T = x.length;
  for (int64_t b = blockIdx.x; b < x.batch; b += gridDim.x) {
    acc_t count[1] = {1};
    if (p.loss_agg == ppo::kSeqMeanTokenMean) {  // only this mode weighs by the row's own token count
      count[0] = 0;
      for (int64_t t = threadIdx.x; t < T; t += blockDim.x) count[0] += x.mask[b * T + t] ? acc_t(1) : acc_t(0);
      block_reduce<1>(count, shared, SumOp(), acc_t(0));
    }
    if (threadIdx.x == 0) row_weight = ppo::token_weight(p, num_tokens, num_seqs, static_cast<double>(count[0]));
    __syncthreads();
    const double w = row_weight;
    const acc_t w_policy = static_cast<acc_t>(w * g_policy), w_kl = static_cast<acc_t>(w * g_kl);
    const acc_t w_value = static_cast<acc_t>(w * g_value), w_entropy = static_cast<acc_t>(w * g_entropy);
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const int64_t i = b * T + t;
      const bool valid = x.mask[i];
      acc_t d_lp = 0, d_v = 0;
      if (valid) {
        const acc_t logprob = to_acc(x.logprobs[i]);
        d_lp = w_policy * ppo::policy_token<acc_t>(logprob, to_acc(x.old_logprobs[i]), to_acc(x.advantages[i]), max_lr,
                                                   lo, hi, dual_clip).dloss;
        if (kKl != ppo::kNoKl) {
          d_lp += w_kl * ppo::kl_token<kKl, acc_t>(logprob, to_acc(x.ref_logprobs[i]), max_lr).dkl;
        }
        if (grad_values) {
          d_v = w_value * ppo::value_token<acc_t>(to_acc(x.values[i]), to_acc(x.old_values[i]), to_acc(x.returns[i]),
                                                  value_clip).dloss;
        }
      }
      grad_logprobs[i] = store_grad<scalar_t>(d_lp);
      if (grad_values) grad_values[i] = store_grad<scalar_t>(d_v);
      if (grad_entropy) grad_entropy[i] = store_grad<scalar_t>(valid ? w_entropy : acc_t(0));
    }
    __syncthreads();  // row_weight is rewritten for the next row
  }
}

template <typename scalar_t, int kKl>
__global__ void __launch_bounds__(kThreads)
    kl_penalty_kernel(const scalar_t* __restrict__ logprobs, const scalar_t* __restrict__ ref_logprobs, int64_t n,
                      acc_t<scalar_t> max_lr, acc_t<scalar_t>* __restrict__ out) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = ppo::kl_token<kKl, acc_t>(to_acc(logprobs[i]), to_acc(ref_logprobs[i]), max_lr).kl;
  }
}

// ---- launchers ----

// workspace: forward_blocks(batch) * kNumPart doubles; out: kNumOut values.
template <typename scalar_t>
cudaError_t launch_ppo_loss_forward(const TokenArgs<scalar_t>& x, const ppo::Params& p, double* workspace,
                                    acc_t<scalar_t>* out, cudaStream_t stream) {
  int blocks = 0;
  if (x.batch > 0 && x.length > 0) {
    blocks = forward_blocks(x.batch);
    switch (p.kl_estimator) {
      case ppo::kK1: ppo_loss_forward_kernel<scalar_t, ppo::kK1><<<blocks, kThreads, 0, stream>>>(x, p, workspace); break;
      case ppo::kK2: ppo_loss_forward_kernel<scalar_t, ppo::kK2><<<blocks, kThreads, 0, stream>>>(x, p, workspace); break;
      case ppo::kK3: ppo_loss_forward_kernel<scalar_t, ppo::kK3><<<blocks, kThreads, 0, stream>>>(x, p, workspace); break;
      default: ppo_loss_forward_kernel<scalar_t, ppo::kNoKl><<<blocks, kThreads, 0, stream>>>(x, p, workspace); break;
    }
  }
  ppo_loss_combine_kernel<acc_t<scalar_t>><<<1, kThreads, 0, stream>>>(workspace, blocks, p, out);
  return cudaGetLastError();
}

// grad_out, out: the forward output's gradient and value ([kNumOut], device). grad_values /
// grad_entropy: nullptr when values / entropy are absent.
template <typename scalar_t>
cudaError_t launch_ppo_loss_backward(const TokenArgs<scalar_t>& x, const ppo::Params& p,
                                     const acc_t<scalar_t>* grad_out,
                                     const acc_t<scalar_t>* out, scalar_t* grad_logprobs,
                                     scalar_t* grad_values, scalar_t* grad_entropy, cudaStream_t stream) {
  if (x.batch <= 0 || x.length <= 0) return cudaSuccess;
  const int blocks = static_cast<int>(x.batch < kMaxRowBlocks ? x.batch : kMaxRowBlocks);
#define RLHF_PPO_BACKWARD(KL)                                                                             \
  ppo_loss_backward_kernel<scalar_t, KL><<<blocks, kThreads, 0, stream>>>(x, p, grad_out, out, grad_logprobs, \
                                                                          grad_values, grad_entropy)
  switch (p.kl_estimator) {
    case ppo::kK1: RLHF_PPO_BACKWARD(ppo::kK1); break;
    case ppo::kK2: RLHF_PPO_BACKWARD(ppo::kK2); break;
    case ppo::kK3: RLHF_PPO_BACKWARD(ppo::kK3); break;
    default: RLHF_PPO_BACKWARD(ppo::kNoKl); break;
  }
#undef RLHF_PPO_BACKWARD
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_kl_penalty(const scalar_t* logprobs, const scalar_t* ref_logprobs, int64_t n, int estimator,
                              acc_t<scalar_t> max_lr, acc_t<scalar_t>* out,
                              cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
  switch (estimator) {
    case ppo::kK1: kl_penalty_kernel<scalar_t, ppo::kK1><<<blocks, kThreads, 0, stream>>>(logprobs, ref_logprobs, n, max_lr, out); break;
    case ppo::kK2: kl_penalty_kernel<scalar_t, ppo::kK2><<<blocks, kThreads, 0, stream>>>(logprobs, ref_logprobs, n, max_lr, out); break;
    default: kl_penalty_kernel<scalar_t, ppo::kK3><<<blocks, kThreads, 0, stream>>>(logprobs, ref_logprobs, n, max_lr, out); break;
  }
  return cudaGetLastError();
}

}  // namespace ppo_cuda
}  // namespace rlhf_ext

#ifdef RLHF_EXT_HEADER_SELFTEST
// Compiling this header alone generates the device code of every launcher and dtype.
#define RLHF_PPO_INSTANTIATE(T)                                                                                  \
  template cudaError_t rlhf_ext::ppo_cuda::launch_ppo_loss_forward<T>(                                          \
      const rlhf_ext::ppo_cuda::TokenArgs<T>&, const rlhf_ext::ppo::Params&, double*, rlhf_ext::acc_t<T>*,       \
      cudaStream_t);                                                                                             \
  template cudaError_t rlhf_ext::ppo_cuda::launch_ppo_loss_backward<T>(                                         \
      const rlhf_ext::ppo_cuda::TokenArgs<T>&, const rlhf_ext::ppo::Params&, const rlhf_ext::acc_t<T>*,          \
      const rlhf_ext::acc_t<T>*, T*, T*, T*, cudaStream_t);                                                      \
  template cudaError_t rlhf_ext::ppo_cuda::launch_kl_penalty<T>(const T*, const T*, int64_t, int,                \
                                                                rlhf_ext::acc_t<T>, rlhf_ext::acc_t<T>*,         \
                                                                cudaStream_t);
RLHF_PPO_INSTANTIATE(float)
RLHF_PPO_INSTANTIATE(__nv_bfloat16)
RLHF_PPO_INSTANTIATE(__half)
RLHF_PPO_INSTANTIATE(double)
#undef RLHF_PPO_INSTANTIATE
#endif
