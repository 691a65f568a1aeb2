// Masked moments and whitening on CUDA, deterministic and without host syncs:
//   moments_partial_kernel: each block owns a fixed contiguous segment; it sums (count, deviations from the
//     segment's first selected value) with block reductions, then the squared deviations from its own
//     segment mean (the segment is re-read from L2), and writes (count, mean, M2) for the segment;
//   moments_combine_kernel: one thread merges the segments in index order (Chan's formula), so the
//     result does not depend on scheduling; stats stay on the device;
//   whiten_kernel: elementwise, reading the stats from device memory.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cstdint>

#include "common.cuh"

namespace rlhf_ext {
namespace cuda {

constexpr int kMomentThreads = 256;
constexpr int64_t kMomentSegment = 16384;  // elements per block segment

template <typename scalar_t>
__global__ void __launch_bounds__(kMomentThreads) moments_partial_kernel(const scalar_t* __restrict__ x,
                                                                       const bool* __restrict__ mask, int64_t numel,
                                                                       double* __restrict__ partials) {
  using Reduce = cub::BlockReduce<double, kMomentThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ double shared_mean;
  __shared__ unsigned int shared_to_end;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kMomentSegment;
  const int64_t end = begin + kMomentSegment < numel ? begin + kMomentSegment : numel;

  // Pivot: the segment's first selected value (as on CPU, csrc/cpu/whiten.cpp). Deviations from it are summed,
  // so a constant segment has exactly zero deviations: an exact mean and M2 = 0 however large the values.
  // The first index is found as the largest `kMomentSegment - index` over the threads' own first selected
  // elements (0: none), with a shared-memory atomicMax (order-independent, so deterministic).
  if (threadIdx.x == 0) shared_to_end = 0;
  __syncthreads();
  for (int64_t i = begin + threadIdx.x; i < end; i += kMomentThreads) {
    if (mask[i]) {
      atomicMax(&shared_to_end, static_cast<unsigned int>(kMomentSegment - (i - begin)));
      break;
    }
  }
  __syncthreads();
  const unsigned int to_end = shared_to_end;
  const double pivot = to_end > 0 ? static_cast<double>(to_acc(x[begin + kMomentSegment - to_end])) : 0.0;
  double count = 0, sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kMomentThreads) {
    if (mask[i]) {
      count += 1;
      sum += static_cast<double>(to_acc(x[i])) - pivot;
    }
  }
  const double block_count = Reduce(storage).Sum(count);
  __syncthreads();
  const double block_sum = Reduce(storage).Sum(sum);
  if (threadIdx.x == 0) shared_mean = block_count > 0 ? pivot + block_sum / block_count : 0.0;
  __syncthreads();
  const double mean = shared_mean;
  double m2 = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kMomentThreads) {
    const double d = mask[i] ? static_cast<double>(to_acc(x[i])) - mean : 0.0;
    m2 += d * d;
  }
  const double block_m2 = Reduce(storage).Sum(m2);
  if (threadIdx.x == 0) {
    partials[3 * blockIdx.x + 0] = block_count;
    partials[3 * blockIdx.x + 1] = mean;
    partials[3 * blockIdx.x + 2] = block_m2;
  }
}

// out: [3] (count, mean, M2) in the statistics type.
template <typename stat_t>
__global__ void moments_combine_kernel(const double* __restrict__ partials, int num_segments, stat_t* __restrict__ out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double n = 0, mean = 0, m2 = 0;
  for (int s = 0; s < num_segments; ++s) {
    const double nb = partials[3 * s], mb = partials[3 * s + 1], m2b = partials[3 * s + 2];
    if (nb == 0) continue;
    if (n == 0) {  // the first segment is taken as is: delta^2 * 0 would be NaN once delta^2 overflows
      n = nb, mean = mb, m2 = m2b;
      continue;
    }
    const double total = n + nb;
    const double delta = mb - mean;
    mean += delta * nb / total;
    m2 += m2b + delta * delta * n * nb / total;
    n = total;
  }
  out[0] = static_cast<stat_t>(n);
  out[1] = static_cast<stat_t>(mean);
  out[2] = static_cast<stat_t>(m2);
}

template <typename scalar_t, typename out_t>
__global__ void whiten_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                              const out_t* __restrict__ moments, int64_t numel, bool shift_mean, bool unbiased,
                              double eps, out_t* __restrict__ out) {
  using acc_t = out_t;
  const acc_t count = moments[0];
  const acc_t mean = moments[1];
  const acc_t var = moments[2] / (unbiased ? count - acc_t(1) : count);
  const acc_t inv_std = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
  const acc_t add_back = shift_mean ? acc_t(0) : mean;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] ? (static_cast<acc_t>(to_acc(x[i])) - mean) * inv_std + add_back : acc_t(0);
  }
}

inline int moments_num_segments(int64_t numel) {
  return numel == 0 ? 1 : static_cast<int>((numel + kMomentSegment - 1) / kMomentSegment);
}

// partials: device scratch of 3 * moments_num_segments(numel) doubles; out: [3] device stats.
template <typename scalar_t, typename stat_t = typename AccType<scalar_t>::type>
cudaError_t launch_masked_moments(const scalar_t* x, const bool* mask, int64_t numel, double* partials, stat_t* out,
                                  cudaStream_t stream) {
  const int segments = moments_num_segments(numel);
  moments_partial_kernel<scalar_t><<<segments, kMomentThreads, 0, stream>>>(x, mask, numel, partials);
  moments_combine_kernel<stat_t><<<1, 32, 0, stream>>>(partials, segments, out);
  return cudaGetLastError();
}

template <typename scalar_t, typename out_t = typename AccType<scalar_t>::type>
cudaError_t launch_masked_whiten(const scalar_t* x, const bool* mask, const out_t* moments, int64_t numel,
                                 bool shift_mean, bool unbiased, double eps, out_t* out, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const unsigned int blocks = ceil_div(numel, 256) < 65535u ? ceil_div(numel, 256) : 65535u;
  whiten_kernel<scalar_t, out_t><<<blocks, 256, 0, stream>>>(x, mask, moments, numel, shift_mean, unbiased, eps, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace rlhf_ext

#ifdef RLHF_EXT_HEADER_SELFTEST
#define RLHF_EXT_INSTANTIATE_WHITEN(T, S)                                                                        \
  template cudaError_t rlhf_ext::cuda::launch_masked_moments<T>(const T*, const bool*, int64_t, double*, S*,     \
                                                                 cudaStream_t);                                  \
  template cudaError_t rlhf_ext::cuda::launch_masked_whiten<T>(const T*, const bool*, const S*, int64_t, bool,  \
                                                                bool, double, S*, cudaStream_t);
RLHF_EXT_INSTANTIATE_WHITEN(float, float)
RLHF_EXT_INSTANTIATE_WHITEN(double, double)
RLHF_EXT_INSTANTIATE_WHITEN(__half, float)
RLHF_EXT_INSTANTIATE_WHITEN(__nv_bfloat16, float)
#endif
