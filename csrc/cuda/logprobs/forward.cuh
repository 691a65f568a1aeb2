// gather_logprobs on CUDA, part 2 of 3: the forward kernels. Per row one pass keeps the online triple
// (m, s, w) = (max, sum e^(x-m), sum e^(x-m)(x-m)) per thread, merged across threads and, for long rows, across
// the row's splits by the combine kernel (csrc/cuda/logprobs.cuh has the maths and the launchers).
#pragma once

#include <cassert>
#include <cstdint>

#include "params.cuh"

namespace rlhf_ext::cuda::logprobs {
namespace detail {

template <typename A>
struct Online {
  A m, s, w;  // max, sum e^(x-m), sum e^(x-m) (x-m); m is never NaN (comparisons drop it), s is
};

template <bool kEntropy, typename A>
__device__ __forceinline__ void raise_max(Online<A>& st, A new_max) {
  const A d = clamp_low(st.m - new_max);
  const A f = fast_exp(d);
  if (kEntropy) st.w = f * (st.w + st.s * d);
  st.s *= f;
  st.m = new_max;
}

template <bool kEntropy, typename A>
__device__ __forceinline__ void add_value(Online<A>& st, A x) {  // requires x <= st.m, or x NaN
  const A d = clamp_low(x - st.m);                              // -inf logits land on the clamp
  const A e = fast_exp(d);
  st.s += e;
  if (kEntropy) st.w = fma(e, d, st.w);
}

template <bool kEntropy, typename A, int N>
__device__ __forceinline__ void add_values(Online<A>& st, const A (&x)[N]) {
  A mx = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) mx = max_of(mx, x[k]);
  if (mx > st.m) raise_max<kEntropy>(st, mx);
#pragma unroll
  for (int k = 0; k < N; ++k) add_value<kEntropy>(st, x[k]);
}

template <bool kEntropy, typename A>
__device__ __forceinline__ Online<A> merge(const Online<A>& a, const Online<A>& b) {
  const A M = max_of(a.m, b.m);
  const A da = clamp_low(a.m - M), db = clamp_low(b.m - M);
  const A fa = fast_exp(da), fb = fast_exp(db);
  Online<A> r;
  r.m = M;
  r.s = a.s * fa + b.s * fb;
  r.w = kEntropy ? fa * (a.w + a.s * da) + fb * (b.w + b.s * db) : A(0);
  return r;
}

template <bool kEntropy, typename A>
__device__ __forceinline__ Online<A> warp_reduce(Online<A> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Online<A> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
    st = merge<kEntropy>(st, o);
  }
  return st;
}

// Result valid in thread 0.
template <bool kEntropy, typename A>
__device__ __forceinline__ Online<A> block_reduce(Online<A> st) {
  __shared__ Online<A> partial[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st = warp_reduce<kEntropy>(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? partial[lane] : Online<A>{Lim<A>::kLowest, A(0), A(0)};
    st = warp_reduce<kEntropy>(st);
  }
  return st;
}

template <typename T, bool kEntropy>
__device__ __forceinline__ void finalize(const ForwardParams<T>& p, int64_t row, int64_t label, const T* z,
                                         const Online<acc_t<T>>& st) {
  using A = acc_t<T>;
  const A log_s = log(st.s);
  A logprob;
  if (label >= 0 && label < p.vocab) {
    logprob = (to_acc(z[label]) * p.inv_temperature - st.m) - log_s;
  } else {
    assert(false && "rlhf_ext gather_logprobs: a label is outside [0, V) and is not ignore_index");
    logprob = quiet_nan(A(0));
  }
  p.logprobs[row] = logprob;
  p.lse[row] = st.m + log_s;
  p.entropy[row] = kEntropy ? log_s - st.w / st.s : A(0);
}

template <typename T>
__device__ __forceinline__ void write_ignored(const ForwardParams<T>& p, int64_t row) {
  p.logprobs[row] = 0;
  p.entropy[row] = 0;
  p.lse[row] = 0;
}

// This thread's share of groups [begin, end) of row z, in the fixed order described at the top.
template <typename T, bool kEntropy, bool kAligned>
__device__ __forceinline__ void reduce_groups(const T* z, int64_t begin, int64_t end, acc_t<T> inv_t,
                                              Online<acc_t<T>>& st) {
  using A = acc_t<T>;
  constexpr int kVec = Pack<T>::kVec;
  for (int64_t v0 = begin + threadIdx.x; v0 < end; v0 += kThreads * kUnroll) {
    Pack<T> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + u * kThreads < end) in[u] = load_group<T, kAligned>(z, v0 + u * kThreads);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + u * kThreads < end) {
        A x[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[k] = to_acc(in[u].v[k]) * inv_t;
        add_values<kEntropy>(st, x);
      }
    }
  }
}

// grid (rows, splits): block (r, s) reduces groups [s * per, (s + 1) * per) of row r; split 0 also
// takes the V % kVec tail. One split: finalises; several: writes (m, s, w) to workspace.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(ForwardParams<T> p, int splits, acc_t<T>* workspace) {
  using A = acc_t<T>;
  constexpr int kVec = Pack<T>::kVec;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    if (splits == 1 && threadIdx.x == 0) write_ignored(p, row);
    return;
  }
  const T* z = p.logits + p.layout.offset(row);
  const int64_t groups = p.vocab / kVec;
  const int64_t per = (groups + splits - 1) / splits;
  const int64_t begin = min(groups, split * per), end = min(groups, begin + per);
  const A inv_t = p.inv_temperature;

  Online<A> st{Lim<A>::kLowest, A(0), A(0)};
  if (reinterpret_cast<uintptr_t>(z) % 16 == 0) {
    reduce_groups<T, kEntropy, true>(z, begin, end, inv_t, st);
  } else {
    reduce_groups<T, kEntropy, false>(z, begin, end, inv_t, st);
  }
  const int64_t tail = groups * kVec;  // fewer than kVec elements
  if (split == 0 && threadIdx.x < p.vocab - tail) {
    const A x = to_acc(z[tail + threadIdx.x]) * inv_t;
    if (x > st.m) raise_max<kEntropy>(st, x);
    add_value<kEntropy>(st, x);
  }
  st = block_reduce<kEntropy>(st);
  if (threadIdx.x != 0) return;
  if (splits == 1) {
    finalize<T, kEntropy>(p, row, label, z, st);
  } else {
    A* out = workspace + (row * splits + split) * 3;
    out[0] = st.m;
    out[1] = st.s;
    out[2] = st.w;
  }
}

// One warp per row merges the row's `splits` partial (m, s, w) and finalises.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(ForwardParams<T> p, int splits, const acc_t<T>* workspace) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;  // warp-uniform
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    if (lane == 0) write_ignored(p, row);
    return;
  }
  Online<A> st{Lim<A>::kLowest, A(0), A(0)};
  for (int j = lane; j < splits; j += 32) {
    const A* part = workspace + (row * splits + j) * 3;
    st = merge<kEntropy>(st, Online<A>{part[0], part[1], part[2]});
  }
  st = warp_reduce<kEntropy>(st);
  if (lane == 0) finalize<T, kEntropy>(p, row, label, p.logits + p.layout.offset(row), st);
}

}  // namespace detail
}  // namespace rlhf_ext::cuda::logprobs
