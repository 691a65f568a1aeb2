// gather_logprobs on CUDA, part 3 of 3: the backward kernel, elementwise over each row's gradient
// dz_j = (g [j == label] - p_j (g + h (x_j - lse + H))) / T (csrc/cuda/logprobs.cuh has the maths and launchers).
#pragma once

#include <cstdint>

#include "params.cuh"

namespace rlhf_ext::cuda::logprobs {
namespace detail {

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
}  // namespace rlhf_ext::cuda::logprobs
