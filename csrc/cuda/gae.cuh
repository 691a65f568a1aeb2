// GAE on CUDA without a serial loop over time: one block per row, the row processed in chunks
// from its end, each chunk as two block-wide scans in reverse-time order:
//   1. "next valid value": an exclusive scan where the latest valid (value) wins, seeded with the
//      bootstrap value, so masked positions are skipped exactly as in the CPU kernel;
//   2. the linear recurrence A_t = gamma*lam*A_{t+1} + delta_t as an inclusive scan of affine maps
//      (a, b): x -> a*x + b, composed associatively (masked positions are the identity map).
// No division appears, so nothing overflows at long T: the running products only underflow to 0.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "common.cuh"

namespace rlhf_ext {
namespace cuda {

template <typename acc_t>
struct NextValue {
  acc_t value;
  int valid;
};

template <typename acc_t>
struct LastValidWins {
  __device__ __forceinline__ NextValue<acc_t> operator()(const NextValue<acc_t>& earlier,
                                                         const NextValue<acc_t>& later) const {
    return later.valid ? later : earlier;
  }
};

template <typename acc_t>
struct Affine {
  acc_t a, b;
};

template <typename acc_t>
struct ComposeAffine {
  // Apply `first`, then `second`: x -> second.a * (first.a * x + first.b) + second.b.
  __device__ __forceinline__ Affine<acc_t> operator()(const Affine<acc_t>& first, const Affine<acc_t>& second) const {
    return {second.a * first.a, second.a * first.b + second.b};
  }
};

// Carries a scan across chunks: cub calls it (in the first warp) with the chunk's aggregate.
template <typename T, typename Op>
struct RunningPrefix {
  T running;
  Op op;
  __device__ T operator()(const T& chunk_aggregate) {
    T before = running;
    running = op(running, chunk_aggregate);
    return before;
  }
};

constexpr int kGaeThreads = 256;
constexpr int kGaeItems = 4;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGaeThreads) gae_kernel(const scalar_t* __restrict__ rewards,
                                                        const scalar_t* __restrict__ values,
                                                        const bool* __restrict__ mask,
                                                        const acc_t* __restrict__ last_values,
                                                        acc_t* __restrict__ advantages, acc_t* __restrict__ returns,
                                                        int64_t T, acc_t gamma, acc_t gamma_lam) {
  using NextScan = cub::BlockScan<NextValue<acc_t>, kGaeThreads>;
  using AffineScan = cub::BlockScan<Affine<acc_t>, kGaeThreads>;
  __shared__ union {
    typename NextScan::TempStorage next;
    typename AffineScan::TempStorage affine;
  } storage;

  const int64_t row = blockIdx.x;
  const scalar_t* r = rewards + row * T;
  const scalar_t* v = values + row * T;
  const bool* m = mask + row * T;
  acc_t* adv = advantages + row * T;
  acc_t* ret = returns + row * T;

  RunningPrefix<NextValue<acc_t>, LastValidWins<acc_t>> next_prefix{
      {last_values ? last_values[row] : acc_t(0), 1}, LastValidWins<acc_t>{}};
  RunningPrefix<Affine<acc_t>, ComposeAffine<acc_t>> affine_prefix{{acc_t(1), acc_t(0)}, ComposeAffine<acc_t>{}};

  constexpr int64_t kChunk = kGaeThreads * kGaeItems;
  for (int64_t chunk = 0; chunk < T; chunk += kChunk) {
    NextValue<acc_t> next[kGaeItems];
    acc_t value[kGaeItems], reward[kGaeItems];
    bool valid[kGaeItems];
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      // scan index s walks time backwards: t = T - 1 - s
      const int64_t s = chunk + threadIdx.x * kGaeItems + j;
      const int64_t t = T - 1 - s;
      valid[j] = s < T && m[t];
      value[j] = valid[j] ? to_acc(v[t]) : acc_t(0);
      reward[j] = valid[j] ? to_acc(r[t]) : acc_t(0);
      next[j] = {value[j], valid[j] ? 1 : 0};
    }
    NextScan(storage.next).ExclusiveScan(next, next, LastValidWins<acc_t>{}, next_prefix);
    __syncthreads();

    Affine<acc_t> step[kGaeItems];
#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      const acc_t delta = reward[j] + gamma * next[j].value - value[j];
      step[j] = valid[j] ? Affine<acc_t>{gamma_lam, delta} : Affine<acc_t>{acc_t(1), acc_t(0)};
    }
    AffineScan(storage.affine).InclusiveScan(step, step, ComposeAffine<acc_t>{}, affine_prefix);
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kGaeItems; ++j) {
      const int64_t s = chunk + threadIdx.x * kGaeItems + j;
      if (s >= T) continue;
      const int64_t t = T - 1 - s;
      // The composed map applied to A = 0 (after the row's end) is its offset b.
      adv[t] = valid[j] ? step[j].b : acc_t(0);
      ret[t] = valid[j] ? step[j].b + value[j] : acc_t(0);
    }
  }
}

// rewards, values: [B, T] contiguous; mask: [B, T] bool; last_values: [B] or nullptr;
// advantages, returns: [B, T] outputs in the accumulation type.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
cudaError_t launch_gae(const scalar_t* rewards, const scalar_t* values, const bool* mask, const acc_t* last_values,
                       acc_t* advantages, acc_t* returns, int64_t B, int64_t T, double gamma, double lam,
                       cudaStream_t stream) {
  if (B == 0 || T == 0) return cudaSuccess;
  gae_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B), kGaeThreads, 0, stream>>>(
      rewards, values, mask, last_values, advantages, returns, T, static_cast<acc_t>(gamma),
      static_cast<acc_t>(gamma * lam));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_ext

#ifdef RLHF_EXT_HEADER_SELFTEST
template cudaError_t rlhf_ext::cuda::launch_gae<float>(const float*, const float*, const bool*, const float*, float*,
                                                       float*, int64_t, int64_t, double, double, cudaStream_t);
template cudaError_t rlhf_ext::cuda::launch_gae<double>(const double*, const double*, const bool*, const double*,
                                                        double*, double*, int64_t, int64_t, double, double,
                                                        cudaStream_t);
template cudaError_t rlhf_ext::cuda::launch_gae<__half>(const __half*, const __half*, const bool*, const float*,
                                                        float*, float*, int64_t, int64_t, double, double, cudaStream_t);
template cudaError_t rlhf_ext::cuda::launch_gae<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                               const bool*, const float*, float*, float*, int64_t,
                                                               int64_t, double, double, cudaStream_t);
#endif
