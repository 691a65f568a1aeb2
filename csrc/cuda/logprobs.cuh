// gather_logprobs CUDA kernels and launchers. Framework-free: raw pointers, sizes and a cudaStream_t
// (the torch binding is csrc/cuda/logprobs.cu). Maths as in csrc/logprobs_cpu_kernels.h:
//   forward, per row of x = z / T: one pass keeping (m, s, w) = (max, sum e^(x-m), sum e^(x-m)(x-m)),
//     lse = m + log s, logprob = x[label] - lse, entropy = log s - w / s;
//   backward: dz_j = (g [j == label] - p_j (g + h (x_j - lse + H))) / T, p_j = e^(x_j - lse).
// Loads are 16-byte vectors (4 floats or 8 halves/bfloat16s); a row whose start is not 16-byte aligned
// (odd V, sliced logits) gets a short scalar head and tail. When rows are few or V is large, the
// forward splits each row over several blocks and a second small kernel merges their partial
// (m, s, w); the backward is a 2-D grid (row x column tile). No host synchronisation, no atomics, no
// workspace zeroing: graph-capturable. A label outside [0, V) that is not ignore_index trips a device
// assert (like torch's nll_loss) and, with asserts compiled out, gives NaN and no out-of-row access.
#ifndef RLHF_EXT_CUDA_LOGPROBS_CUH
#define RLHF_EXT_CUDA_LOGPROBS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

namespace rlhf_ext::cuda::logprobs {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;                           // 16-byte loads in flight per thread
constexpr float kLowest = -3.402823466e+38f;         // running-max start: finite, so lowest - lowest = 0
constexpr float kClampLow = -200.f;                  // x - m below this has exp exactly 0 in float
constexpr int64_t kMaxRows = 2147483647;             // rows go on grid.x

// Row r of a [..., V] tensor (unit last stride) whose leading dims collapse to at most two:
// offset(r) = (r / inner) * outer_stride + (r % inner) * inner_stride, in elements.
struct RowLayout {
  int64_t inner;
  int64_t outer_stride;
  int64_t inner_stride;
  __host__ __device__ int64_t offset(int64_t r) const { return (r / inner) * outer_stride + (r % inner) * inner_stride; }
};

template <typename T>
struct ForwardParams {
  const T* logits;
  RowLayout layout;
  int64_t rows, vocab;
  const int64_t* labels;  // [rows]
  float* logprobs;        // [rows]
  float* entropy;         // [rows], 0 unless with_entropy
  float* lse;             // [rows]
  float inv_temperature;
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
  const float* grad_logprobs;  // [rows] or nullptr
  const float* grad_entropy;   // [rows] or nullptr
  const float* lse;
  const float* entropy;
  float inv_temperature;
  int64_t ignore_index;
};

namespace detail {

template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements before the first 16-byte boundary of a row (0 when aligned), and whole packs after it.
template <typename T>
__device__ __forceinline__ void row_split(const T* z, int64_t vocab, int64_t& head, int64_t& packs) {
  constexpr int kVec = Pack<T>::kVec;
  const int64_t misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(z) % 16) / sizeof(T));
  head = misalign ? (kVec - misalign < vocab ? kVec - misalign : vocab) : 0;
  packs = (vocab - head) / kVec;
}

struct Online {
  float m, s, w;  // max, sum e^(x-m), sum e^(x-m) (x-m)
};

template <bool kEntropy>
__device__ __forceinline__ void raise_max(Online& st, float new_max) {
  const float d = fmaxf(st.m - new_max, kClampLow);
  const float f = __expf(d);
  if (kEntropy) st.w = f * (st.w + st.s * d);
  st.s *= f;
  st.m = new_max;
}

template <bool kEntropy>
__device__ __forceinline__ void add_value(Online& st, float x) {  // requires x <= st.m
  const float d = fmaxf(x - st.m, kClampLow);                      // -inf logits land on the clamp
  const float e = __expf(d);
  st.s += e;
  if (kEntropy) st.w = fmaf(e, d, st.w);
}

template <bool kEntropy, int N>
__device__ __forceinline__ void add_values(Online& st, const float (&x)[N]) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) mx = fmaxf(mx, x[k]);
  if (mx > st.m) raise_max<kEntropy>(st, mx);
#pragma unroll
  for (int k = 0; k < N; ++k) add_value<kEntropy>(st, x[k]);
}

template <bool kEntropy>
__device__ __forceinline__ Online merge(const Online& a, const Online& b) {
  const float M = fmaxf(a.m, b.m);
  const float da = fmaxf(a.m - M, kClampLow), db = fmaxf(b.m - M, kClampLow);
  const float fa = __expf(da), fb = __expf(db);
  Online r;
  r.m = M;
  r.s = a.s * fa + b.s * fb;
  r.w = kEntropy ? fa * (a.w + a.s * da) + fb * (b.w + b.s * db) : 0.f;
  return r;
}

template <bool kEntropy>
__device__ __forceinline__ Online warp_reduce(Online st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Online o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
    st = merge<kEntropy>(st, o);
  }
  return st;
}

// Result valid in thread 0.
template <bool kEntropy>
__device__ __forceinline__ Online block_reduce(Online st) {
  __shared__ Online partial[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st = warp_reduce<kEntropy>(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? partial[lane] : Online{kLowest, 0.f, 0.f};
    st = warp_reduce<kEntropy>(st);
  }
  return st;
}

template <typename T, bool kEntropy>
__device__ __forceinline__ void finalize(const ForwardParams<T>& p, int64_t row, int64_t label, const T* z,
                                         const Online& st) {
  const float log_s = logf(st.s);
  float logprob;
  if (label >= 0 && label < p.vocab) {
    logprob = (to_float(z[label]) * p.inv_temperature - st.m) - log_s;
  } else {
    assert(false && "rlhf_ext gather_logprobs: a label is outside [0, V) and is not ignore_index");
    logprob = __int_as_float(0x7fc00000);  // NaN
  }
  p.logprobs[row] = logprob;
  p.lse[row] = st.m + log_s;
  p.entropy[row] = kEntropy ? log_s - st.w / st.s : 0.f;
}

template <typename T>
__device__ __forceinline__ void write_ignored(const ForwardParams<T>& p, int64_t row) {
  p.logprobs[row] = 0.f;
  p.entropy[row] = 0.f;
  p.lse[row] = 0.f;
}

// grid (rows, splits): block (r, s) reduces packs [s * per, (s + 1) * per) of row r; split 0 also
// takes the unaligned head and the tail. One split: finalises; several: writes (m, s, w) to workspace.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams<T> p, int splits, float* workspace) {
  constexpr int kVec = Pack<T>::kVec;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    if (splits == 1 && threadIdx.x == 0) write_ignored(p, row);
    return;
  }
  const T* z = p.logits + p.layout.offset(row);
  int64_t head, packs;
  row_split(z, p.vocab, head, packs);
  const int64_t per = (packs + splits - 1) / splits;
  const int64_t begin = min(packs, split * per), end = min(packs, begin + per);
  const Pack<T>* body = reinterpret_cast<const Pack<T>*>(z + head);
  const float inv_t = p.inv_temperature;

  Online st{kLowest, 0.f, 0.f};
  for (int64_t v0 = begin + threadIdx.x; v0 < end; v0 += kThreads * kUnroll) {
    Pack<T> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + u * kThreads < end) in[u] = body[v0 + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (v0 + u * kThreads < end) {
        float x[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) x[k] = to_float(in[u].v[k]) * inv_t;
        add_values<kEntropy>(st, x);
      }
    }
  }
  if (split == 0) {
    const int64_t tail = head + packs * kVec;  // fewer than kVec elements on each side
    if (threadIdx.x < head) {
      const float x = to_float(z[threadIdx.x]) * inv_t;
      if (x > st.m) raise_max<kEntropy>(st, x);
      add_value<kEntropy>(st, x);
    }
    if (threadIdx.x < p.vocab - tail) {
      const float x = to_float(z[tail + threadIdx.x]) * inv_t;
      if (x > st.m) raise_max<kEntropy>(st, x);
      add_value<kEntropy>(st, x);
    }
  }
  st = block_reduce<kEntropy>(st);
  if (threadIdx.x != 0) return;
  if (splits == 1) {
    finalize<T, kEntropy>(p, row, label, z, st);
  } else {
    float* out = workspace + (row * splits + split) * 3;
    out[0] = st.m;
    out[1] = st.s;
    out[2] = st.w;
  }
}

// One warp per row merges the row's `splits` partial (m, s, w) and finalises.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) combine_kernel(ForwardParams<T> p, int splits, const float* workspace) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;  // warp-uniform
  const int64_t label = p.labels[row];
  if (label == p.ignore_index) {
    if (lane == 0) write_ignored(p, row);
    return;
  }
  Online st{kLowest, 0.f, 0.f};
  for (int j = lane; j < splits; j += 32) {
    const float* part = workspace + (row * splits + j) * 3;
    st = merge<kEntropy>(st, Online{part[0], part[1], part[2]});
  }
  st = warp_reduce<kEntropy>(st);
  if (lane == 0) finalize<T, kEntropy>(p, row, label, p.logits + p.layout.offset(row), st);
}

// grid (rows, tiles): block (r, t) writes packs [t * kThreads * kUnroll, (t + 1) * kThreads * kUnroll)
// of row r's gradient; tile 0 also writes the unaligned head and the tail.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardParams<T> p) {
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
  const float inv_t = p.inv_temperature;
  const float lse = ignored ? 0.f : p.lse[row];
  const float gl = (ignored || !p.grad_logprobs) ? 0.f : p.grad_logprobs[row];
  const float gh = (ignored || !kEntropy) ? 0.f : p.grad_entropy[row];
  const float coef0 = kEntropy ? -(gl + gh * (ignored ? 0.f : p.entropy[row])) * inv_t : -gl * inv_t;
  const float coef1 = -gh * inv_t;
  const float g_label = gl * inv_t;
  auto grad_of = [&](float zj, int64_t j) -> float {
    if (ignored) return 0.f;
    const float lp = fmaxf(fmaf(zj, inv_t, -lse), kClampLow);
    float r = __expf(lp) * (kEntropy ? fmaf(coef1, lp, coef0) : coef0);
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
      for (int k = 0; k < kVec; ++k) out.v[k] = from_float<T>(grad_of(to_float(in[u].v[k]), j0 + k));
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
    if (threadIdx.x < head) g[threadIdx.x] = from_float<T>(grad_of(to_float(z[threadIdx.x]), threadIdx.x));
    if (threadIdx.x < p.vocab - tail) {
      const int64_t j = tail + threadIdx.x;
      g[j] = from_float<T>(grad_of(to_float(z[j]), j));
    }
  }
}

}  // namespace detail

// How many blocks share one row in the forward: enough blocks to fill the GPU (num_sms * 8 resident
// 256-thread blocks) when rows are few, but at least 2 * kThreads 16-byte packs per block.
inline int forward_splits(int64_t rows, int64_t vocab, int elem_bytes, int num_sms) {
  const int64_t target_blocks = int64_t(num_sms) * 8;
  if (rows <= 0 || rows >= target_blocks) return 1;
  const int64_t packs = vocab * elem_bytes / 16;
  int64_t max_splits = packs / (2 * kThreads);
  if (max_splits < 1) max_splits = 1;
  int64_t splits = (target_blocks + rows - 1) / rows;
  if (splits > max_splits) splits = max_splits;
  if (splits > 1024) splits = 1024;
  return static_cast<int>(splits);
}

// Floats of workspace launch_forward needs (0 when splits == 1).
inline int64_t forward_workspace_floats(int64_t rows, int splits) { return splits > 1 ? rows * splits * 3 : 0; }

template <typename T>
cudaError_t launch_forward(const ForwardParams<T>& p, int splits, float* workspace, cudaStream_t stream) {
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
template cudaError_t launch_forward<float>(const ForwardParams<float>&, int, float*, cudaStream_t);
template cudaError_t launch_forward<__nv_bfloat16>(const ForwardParams<__nv_bfloat16>&, int, float*, cudaStream_t);
template cudaError_t launch_forward<__half>(const ForwardParams<__half>&, int, float*, cudaStream_t);
template cudaError_t launch_backward<float>(const BackwardParams<float>&, cudaStream_t);
template cudaError_t launch_backward<__nv_bfloat16>(const BackwardParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_backward<__half>(const BackwardParams<__half>&, cudaStream_t);
}  // namespace rlhf_ext::cuda::logprobs
#endif

#endif  // RLHF_EXT_CUDA_LOGPROBS_CUH
