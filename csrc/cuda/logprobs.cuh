// gather_logprobs CUDA kernels and launchers. Framework-free: raw pointers, sizes and a cudaStream_t
// (the torch binding is csrc/cuda/logprobs.cu). Maths as in csrc/cpu/logprobs_rows.h:
//   forward, per row of x = z / T: one pass keeping (m, s, w) = (max, sum e^(x-m), sum e^(x-m)(x-m)),
//     lse = m + log s, logprob = x[label] - lse, entropy = log s - w / s;
//   backward: dz_j = (g [j == label] - p_j (g + h (x_j - lse + H))) / T, p_j = e^(x_j - lse).
// Accumulation in float for float/half/bfloat16 logits, in double for double logits (outputs, lse and
// the workspace have that type too, as on CPU).
//
// Bits independent of the batch: a row's forward result is a function of the row's values, V and the
// dtype only. Element j of a row always goes to the same thread and the same step of the same split
// (thread t of a split takes the kVec-element groups t, t + kThreads, ... counted from element 0, and
// the V % kVec tail goes to the first threads of split 0), the split count depends only on V and the
// dtype (forward_splits), and the reductions over threads and splits run in a fixed order. A row whose
// start is 16-byte aligned loads its groups as 16-byte vectors; any other row (odd V, sliced logits)
// loads the same groups element by element, in the same order, so it gives the same bits.
// NaN propagates as on CPU: a NaN (or +inf) logit makes the row's log-prob, entropy, lse and gradient
// NaN (clamps below are compare-and-select, which keeps NaN, where fmaxf would drop it).
// No host synchronisation, no atomics, no workspace zeroing: graph-capturable. A label outside [0, V)
// that is not ignore_index trips a device assert (like torch's nll_loss) and, with asserts compiled
// out, gives NaN and no out-of-row access.
//
// This header holds the launchers; the kernels are csrc/cuda/logprobs/{params,forward,backward}.cuh.
#ifndef RLHF_EXT_CUDA_LOGPROBS_CUH
#define RLHF_EXT_CUDA_LOGPROBS_CUH

#include <cuda_runtime.h>

#include <cstdint>

#include "logprobs/backward.cuh"
#include "logprobs/forward.cuh"
#include "logprobs/params.cuh"

namespace rlhf_ext::cuda::logprobs {

// Blocks per row in the forward: a function of the row length and dtype only, never of the batch or
// the GPU, so a row's bits are the same at rollout (few rows) and in training (many rows). One split
// per 2048 16-byte groups (32 KiB of row, at most kMaxSplits): a V = 128256 bf16 row gets 8 blocks,
// float32 16, V = 32000 bf16 2, V <= 16384 bf16 one. Why that size: small batches need blocks to fill
// the GPU (B = 16 decode rows at V = 128256 bf16 give 128 blocks, about one per SM of an H100/H200,
// each streaming 32 KiB, which takes about as long as the launch itself), while a large batch pays for
// splitting only with 3 workspace values per split and a combine kernel reading them: < 0.1 % of the
// bytes the forward reads. The earlier SM-count heuristic split more only for B below ~#SMs * 8 / 8.
inline int forward_splits(int64_t vocab, int elem_bytes) {
  const int64_t groups = vocab * elem_bytes / 16;
  int64_t splits = (groups + kPacksPerSplit - 1) / kPacksPerSplit;
  if (splits < 1) splits = 1;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return static_cast<int>(splits);
}

// Accumulator values of workspace launch_forward needs (0 when splits == 1).
inline int64_t forward_workspace_size(int64_t rows, int splits) { return splits > 1 ? rows * splits * 3 : 0; }

template <typename T>
cudaError_t launch_forward(const ForwardParams<T>& p, int splits, acc_t<T>* workspace, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > kMaxRows || splits < 1 || splits > 65535 || (splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(splits));
  if (p.with_entropy) {
    detail::forward_kernel<T, true><<<grid, kThreads, 0, stream>>>(p, splits, workspace);
  } else {
    detail::forward_kernel<T, false><<<grid, kThreads, 0, stream>>>(p, splits, workspace);
  }
  if (splits > 1) {
    const unsigned blocks = static_cast<unsigned>((p.rows + kThreads / 32 - 1) / (kThreads / 32));
    if (p.with_entropy) {
      detail::combine_kernel<T, true><<<blocks, kThreads, 0, stream>>>(p, splits, workspace);
    } else {
      detail::combine_kernel<T, false><<<blocks, kThreads, 0, stream>>>(p, splits, workspace);
    }
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BackwardParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > kMaxRows) return cudaErrorInvalidValue;
  constexpr int64_t kElemsPerTile = int64_t(kThreads) * kUnroll * detail::Pack<T>::kVec;
  const int64_t tiles = (p.vocab + kElemsPerTile - 1) / kElemsPerTile;
  if (tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(tiles));
  if (p.grad_entropy != nullptr) {
    detail::backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    detail::backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace rlhf_ext::cuda::logprobs

#ifdef RLHF_EXT_HEADER_SELFTEST
namespace rlhf_ext::cuda::logprobs {
#define RLHF_EXT_LOGPROBS_INSTANTIATE(T)                                                            \
  template cudaError_t launch_forward<T>(const ForwardParams<T>&, int, acc_t<T>*, cudaStream_t); \
  template cudaError_t launch_backward<T>(const BackwardParams<T>&, cudaStream_t);
RLHF_EXT_LOGPROBS_INSTANTIATE(float)
RLHF_EXT_LOGPROBS_INSTANTIATE(double)
RLHF_EXT_LOGPROBS_INSTANTIATE(__nv_bfloat16)
RLHF_EXT_LOGPROBS_INSTANTIATE(__half)
#undef RLHF_EXT_LOGPROBS_INSTANTIATE
}  // namespace rlhf_ext::cuda::logprobs
#endif

#endif  // RLHF_EXT_CUDA_LOGPROBS_CUH
