// gather_logprobs CUDA kernels and launchers. Framework-free: raw pointers, sizes and a cudaStream_t
// (the torch binding is csrc/cuda/logprobs.cu). Maths as in csrc/logprobs_cpu_kernels.h:
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
#ifndef RLHF_EXT_CUDA_LOGPROBS_CUH
#define RLHF_EXT_CUDA_LOGPROBS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "common.cuh"

namespace rlhf_ext::cuda::logprobs {

using cuda::RowLayout;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                // 16-byte loads in flight per thread
constexpr int64_t kMaxRows = 2147483647;  // rows go on grid.x
constexpr int64_t kPacksPerSplit = 2048;  // 16-byte groups (32 KiB of row) per forward split
constexpr int kMaxSplits = 64;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename T>
struct ForwardParams {
  const T* logits;
  RowLayout layout;
  int64_t rows, vocab;
  const int64_t* labels;   // [rows]
  acc_t<T>* logprobs;      // [rows]
  acc_t<T>* entropy;       // [rows], 0 unless with_entropy
  acc_t<T>* lse;           // [rows]
  acc_t<T> inv_temperature;
  int64_t ignore_index;
  bool with_entropy;
};

template <typename T>
struct BackwardParams {
  const T* logits;
  RowLayout in_layout;
  T* grad;  // may equal logits (in-place), with the same layout
  RowLayout out_layout;
  int64_t rows, vocab;
  const int64_t* labels;
  const acc_t<T>* grad_logprobs;  // [rows] or nullptr
  const acc_t<T>* grad_entropy;   // [rows] or nullptr
  const acc_t<T>* lse;
  const acc_t<T>* entropy;
  acc_t<T> inv_temperature;
  int64_t ignore_index;
};

namespace detail {

template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// Per accumulation type: the running-max start (finite, so lowest - lowest = 0) and the clamp below
// which exp is exactly 0 (float underflows below -103.3, double below -745.2).
template <typename A>
struct Lim;
template <>
struct Lim<float> {
  static constexpr float kLowest = -3.402823466e+38f, kClampLow = -200.f;
};
template <>
struct Lim<double> {
  static constexpr double kLowest = -1.7976931348623157e+308, kClampLow = -800.0;
};

// max(d, kClampLow) that keeps NaN (fmax would return the clamp for a NaN d).
template <typename A>
__device__ __forceinline__ A clamp_low(A d) { return d < Lim<A>::kClampLow ? Lim<A>::kClampLow : d; }
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float quiet_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double quiet_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Group g of a row (elements [g * kVec, (g + 1) * kVec)): one 16-byte load when the row is aligned.
template <typename T, bool kAligned>
__device__ __forceinline__ Pack<T> load_group(const T* z, int64_t g) {
  if constexpr (kAligned) {
    return reinterpret_cast<const Pack<T>*>(z)[g];
  } else {
    Pack<T> out;
#pragma unroll
    for (int k = 0; k < Pack<T>::kVec; ++k) out.v[k] = z[g * Pack<T>::kVec + k];
    return out;
  }
}

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

// Elements before the first 16-byte boundary of a row (0 when aligned), and whole packs after it.
template <typename T>
__device__ __forceinline__ void row_split(const T* z, int64_t vocab, int64_t& head, int64_t& packs) {
  constexpr int kVec = Pack<T>::kVec;
  const int64_t misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(T));
  head = misalign ? (kVec - misalign < vocab ? kVec - misalign : vocab) : 0;
  packs = (vocab - head) / kVec;
}

// grid (rows, tiles): block (r, t) writes packs [t * kThreads * kUnroll, (t + 1) * kThreads * kUnroll)
// of row r's gradient; tile 0 also writes the unaligned head and the tail. Elementwise, so the bits
// of dz_j depend only on z_j and the row's saved statistics, whatever the alignment.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardParams<T> p) {
  using A = acc_t<T>;
  constexpr int kVec = Pack<T>::kVec;
  constexpr int64_t kPacksPerTile = int64_t(kThreads) * kUnroll;
  const int64_t row = blockIdx.x;
  const int64_t tile = blockIdx.y;
  const T* z = p.logits + p.in_layout.offset(row);
  T* g = p.grad + p.out_layout.offset(row);
  int64_t head, packs;
  row_split(z, p.vocab, head, packs);
  const int64_t begin = tile * kPacksPerTile, end = min(packs, begin + kPacksPerTile);
  // Vector stores need the output row to share the input's 16-byte phase (always true in place).
  const bool vector_store = reinterpret_cast<uintptr_t>(g) % 16 == reinterpret_cast<uintptr_t>(z) % 16;

  const int64_t label = p.labels[row];
  const bool ignored = label == p.ignore_index;
  const A inv_t = p.inv_temperature;
  const A lse = ignored ? A(0) : p.lse[row];
  const A gl = (ignored || !p.grad_logprobs) ? A(0) : p.grad_logprobs[row];
  const A gh = (ignored || !kEntropy) ? A(0) : p.grad_entropy[row];
  const A coef0 = kEntropy ? -(gl + gh * (ignored ? A(0) : p.entropy[row])) * inv_t : -gl * inv_t;
  const A coef1 = -gh * inv_t;
  const A g_label = gl * inv_t;
  auto grad_of = [&](A zj, int64_t j) -> A {
    if (ignored) return A(0);
    const A lp = clamp_low(fma(zj, inv_t, -lse));  // NaN z or lse stays NaN, as on CPU
    A r = fast_exp(lp) * (kEntropy ? fma(coef1, lp, coef0) : coef0);
    return j == label ? r + g_label : r;
  };

  const Pack<T>* body_in = reinterpret_cast<const Pack<T>*>(z + head);
  const int64_t v0 = begin + threadIdx.x;
  Pack<T> in[kUnroll];
  // All loads first: in place, later stores may not be hoisted above them by the compiler. An ignored
  // row only gets zeros written, so its logits are not read.
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (!ignored && v0 + u * kThreads < end) in[u] = body_in[v0 + u * kThreads];
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t v = v0 + u * kThreads;
    if (v < end) {
      const int64_t j0 = head + v * kVec;
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = from_acc<T>(grad_of(to_acc(in[u].v[k]), j0 + k));
      if (vector_store) {
        *reinterpret_cast<Pack<T>*>(g + j0) = out;
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) g[j0 + k] = out.v[k];
      }
    }
  }
  if (tile == 0) {
    const int64_t tail = head + packs * kVec;
    if (threadIdx.x < head) g[threadIdx.x] = from_acc<T>(grad_of(to_acc(z[threadIdx.x]), threadIdx.x));
    if (threadIdx.x < p.vocab - tail) {
      const int64_t j = tail + threadIdx.x;
      g[j] = from_acc<T>(grad_of(to_acc(z[j]), j));
    }
  }
}

}  // namespace detail

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
