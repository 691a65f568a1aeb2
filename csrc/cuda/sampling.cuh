// Fused sampler CUDA kernels (framework-free: raw pointers, sizes, cudaStream_t).
//
// One thread block per row; every pass streams the row with 16-byte loads (the row stays in L2 between passes).
//   pass 1   z = logits / T: online max / sum-exp, first argmax, NaN / +inf detection (one block reduction);
//   top-k    radix select on the order-preserving 32-bit key of z, 11 + 11 + 10 bits: per level a shared-memory
//            histogram (count and fixed-point mass), a block scan from the top bin, and the bin where the count
//            reaches k; the last level leaves a single key, the k-th largest value tau_k (ties kept);
//   top-p    the same select by mass over keys >= tau_k, target top_p * mass(K);
//   draw     Gumbel-max over kept tokens (key >= tau, exp(z - m) >= min_p): argmax of z_i - log(E_i), with
//            E_i = -log(u_i) from Philox4x32-10 keyed by the generator seed, counter (i, row, offset).
// The kept-set rule is the CPU kernel's (csrc/cpu/sampling.cpp). Masses in the selects are 32.32 fixed point and
// summed with integer atomics, so results do not depend on the order in which threads add: the same seed and
// offset give the same tokens. The seed/offset are read through PhiloxSeed, which points at device tensors
// under CUDA-graph capture (as torch's PhiloxCudaState does), so a decode step can be captured.
// A row that cannot be sampled (NaN or +inf logits, no finite logit, settings out of range) gets token -1.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cstdint>

#include "common.cuh"

namespace rlhf_ext {
namespace sampling {

using cuda::to_acc;

constexpr int kThreads = 512;

// Per-row settings: a non-null pointer is a device array [B] that replaces the scalar beside it.
struct RowSettings {
  const float* temperature;
  const int64_t* top_k;
  const double* top_p;
  const float* min_p;
  float temperature_value;
  int64_t top_k_value;
  double top_p_value;
  float min_p_value;
};

// Mirrors at::PhiloxCudaState: plain values, or device pointers under CUDA-graph capture.
struct PhiloxSeed {
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;
  const int64_t* offset_ptr;
  uint64_t offset_intragraph;
};

__host__ __device__ inline uint4 philox4x32_10(uint4 c, uint2 k) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c.x, p1 = uint64_t(0xCD9E8D57u) * c.z;
    c = make_uint4(static_cast<uint32_t>(p1 >> 32) ^ c.y ^ k.x, static_cast<uint32_t>(p1),
                   static_cast<uint32_t>(p0 >> 32) ^ c.w ^ k.y, static_cast<uint32_t>(p0));
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

// Bit tests rather than isnan/isinf so that fast-math builds keep them.
__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool is_pos_inf(float v) { return __float_as_uint(v) == 0x7f800000u; }
__device__ __forceinline__ bool is_neg_inf(float v) { return __float_as_uint(v) == 0xff800000u; }

// Order-preserving key: a < b as floats iff key(a) < key(b); -0 is folded onto +0 so they tie as floats do.
__device__ __forceinline__ uint32_t key_of(float v) {
  uint32_t b = __float_as_uint(v);
  if (b == 0x80000000u) b = 0;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// No conversion between floating point and 64-bit integers appears below: the GPU simulator the CI runs these
// kernels on (tests/sim_harness.py) returns 0 for every 64-bit integer -> float conversion and converts float ->
// 64-bit integer through 32 bits. The forms used give bit-identical results on a GPU.
__device__ __forceinline__ unsigned long long fixed_mass(float w) {
  // w in [0, 1] -> 32.32 fixed point; below 1, w * 2^32 < 2^32 fits 32 bits (truncation as before).
  return w >= 1.f ? (1ull << 32) : static_cast<unsigned long long>(static_cast<uint32_t>(w * 4294967296.0f));
}

// Correctly rounded like a direct conversion: the high half times 2^32 is exact, the sum rounds once.
__device__ __forceinline__ double to_double(unsigned long long v) {
  return static_cast<double>(static_cast<uint32_t>(v >> 32)) * 4294967296.0 +
         static_cast<double>(static_cast<uint32_t>(v));
}

// Calls f(i, logit as float) for this thread's elements of the row, in increasing i.
template <typename T, typename F>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t V, bool vec_ok, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t start = 0;
  if (vec_ok) {
    const int64_t num_vec = V / kVec;
    for (int64_t v = threadIdx.x; v < num_vec; v += blockDim.x) {
      const uint4 raw = reinterpret_cast<const uint4*>(row)[v];
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f(v * kVec + j, to_acc(vals[j]));
    }
    start = num_vec * kVec;
  }
  for (int64_t i = start + threadIdx.x; i < V; i += blockDim.x) f(i, to_acc(row[i]));
}

struct RowStats {  // pass 1: online (max, sum exp), first argmax, flags (1 NaN, 2 +inf)
  float m, s, best;
  int64_t best_index;
  int flags;
};

struct MergeRowStats {
  __device__ RowStats operator()(const RowStats& a, const RowStats& b) const {
    RowStats r;
    r.m = fmaxf(a.m, b.m);
    r.s = (a.s > 0 ? a.s * __expf(a.m - r.m) : 0.f) + (b.s > 0 ? b.s * __expf(b.m - r.m) : 0.f);
    const bool take_b = b.best > a.best || (b.best == a.best && b.best_index < a.best_index);
    r.best = take_b ? b.best : a.best;
    r.best_index = take_b ? b.best_index : a.best_index;
    r.flags = a.flags | b.flags;
    return r;
  }
};

struct Measure {  // (count, fixed-point mass) of a histogram range
  unsigned long long count, mass;
};

struct AddMeasure {
  __device__ Measure operator()(const Measure& a, const Measure& b) const { return {a.count + b.count, a.mass + b.mass}; }
};

struct Pick {  // Gumbel-max candidate and the kept mass
  double score;
  float z;
  int64_t index;
  float kept_mass;
};

struct MergePick {
  __device__ Pick operator()(const Pick& a, const Pick& b) const {
    const bool take_b = b.score > a.score || (b.score == a.score && b.index < a.index);
    Pick r = take_b ? b : a;
    r.kept_mass = a.kept_mass + b.kept_mass;
    return r;
  }
};

constexpr int kMaxBins = 2048;

struct SharedState {
  unsigned int count[kMaxBins];
  unsigned long long mass[kMaxBins];
  union {
    typename cub::BlockReduce<RowStats, kThreads>::TempStorage stats;
    typename cub::BlockScan<Measure, kThreads>::TempStorage scan;
    typename cub::BlockReduce<Pick, kThreads>::TempStorage pick;
  } temp;
  RowStats row;
  int found_bin;
  Measure found_above, found_bin_measure;
  double target;
  Pick pick;
};

struct SelectResult {
  uint32_t key;            // keep keys >= key
  unsigned long long mass_ge;  // fixed-point mass of the kept keys (>= floor)
};

// Largest key t with measure{floor <= key, key >= t} >= target, where measure is the count (by_mass false) or
// the fixed-point mass. With target_fraction > 0 the target is target_fraction * (total mass >= floor).
template <typename T>
__device__ SelectResult radix_select(const T* row, int64_t V, bool vec_ok, float t, float m, uint32_t floor_key,
                                     bool by_mass, double target, double target_fraction, SharedState& sh) {
  const int shifts[3] = {21, 10, 0};
  const int bit_counts[3] = {11, 11, 10};
  uint32_t prefix = 0, prefix_mask = 0;
  Measure above{0, 0}, last_bin{0, 0};
  for (int level = 0; level < 3; ++level) {
    const int shift = shifts[level], nb = 1 << bit_counts[level], per_thread = nb / kThreads;
    for (int b = threadIdx.x; b < nb; b += kThreads) {
      sh.count[b] = 0;
      sh.mass[b] = 0;
    }
    __syncthreads();
    for_each_in_row(row, V, vec_ok, [&](int64_t, float x) {
      const float z = x / t;
      const uint32_t key = key_of(z);
      if (key >= floor_key && (key & prefix_mask) == prefix) {
        const int bin = (key >> shift) & (nb - 1);
        atomicAdd(&sh.count[bin], 1u);
        atomicAdd(&sh.mass[bin], fixed_mass(__expf(z - m)));
      }
    });
    __syncthreads();
    // Thread j owns bins [nb - (j + 1) * per_thread, nb - j * per_thread), scanned from the top bin down.
    const int top = nb - 1 - threadIdx.x * per_thread;
    Measure own{0, 0};
    for (int q = 0; q < per_thread; ++q) own = AddMeasure()(own, {sh.count[top - q], sh.mass[top - q]});
    Measure before, total;
    cub::BlockScan<Measure, kThreads>(sh.temp.scan).ExclusiveScan(own, before, Measure{0, 0}, AddMeasure(), total);
    if (threadIdx.x == 0) {
      sh.found_bin = -1;
      sh.target = (level == 0 && target_fraction > 0) ? target_fraction * to_double(total.mass) : target;
    }
    __syncthreads();
    const double goal = sh.target;
    auto measure = [&](const Measure& x) {
      return to_double(by_mass ? x.mass : x.count);
    };
    Measure cum = AddMeasure()(above, before);
    if (measure(cum) < goal && measure(AddMeasure()(cum, own)) >= goal) {
      for (int q = 0; q < per_thread; ++q) {
        const Measure bin{sh.count[top - q], sh.mass[top - q]};
        if (measure(AddMeasure()(cum, bin)) >= goal) {
          sh.found_bin = top - q;
          sh.found_above = cum;
          sh.found_bin_measure = bin;
          break;
        }
        cum = AddMeasure()(cum, bin);
      }
    }
    __syncthreads();
    const int bin = sh.found_bin;
    if (bin < 0) break;  // the target is out of reach only by rounding: keep the whole current bucket
    prefix |= static_cast<uint32_t>(bin) << shift;
    prefix_mask |= static_cast<uint32_t>(nb - 1) << shift;
    above = sh.found_above;
    last_bin = sh.found_bin_measure;
    target = goal;
    target_fraction = 0;
    __syncthreads();  // sh.found_* and the histogram are rewritten by the next level
  }
  return {prefix > floor_key ? prefix : floor_key, above.mass + last_bin.mass};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* logits, int64_t V, int64_t row_stride, RowSettings s, PhiloxSeed rng, int64_t* tokens,
                  float* logprobs, float* filtered_logprobs) {
  __shared__ SharedState sh;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = (row_stride % kVec == 0) && (reinterpret_cast<uintptr_t>(logits) % 16 == 0);

  const float temperature = s.temperature ? s.temperature[row] : s.temperature_value;
  const int64_t top_k = s.top_k ? s.top_k[row] : s.top_k_value;
  const double top_p = s.top_p ? s.top_p[row] : s.top_p_value;
  const float min_p = s.min_p ? s.min_p[row] : s.min_p_value;
  const bool settings_ok = temperature >= 0.f && !is_pos_inf(temperature) && top_k >= 0 && top_p > 0 &&
                           top_p <= 1 && min_p >= 0.f && min_p <= 1.f;  // NaN settings fail every comparison
  if (!settings_ok) {
    if (threadIdx.x == 0) {
      tokens[row] = -1;
      logprobs[row] = filtered_logprobs[row] = __int_as_float(0x7fc00000);
    }
    return;
  }
  const bool greedy = temperature == 0.f;
  const float t = greedy ? 1.f : temperature;

  RowStats mine{-INFINITY, 0.f, -INFINITY, V, 0};
  for_each_in_row(x, V, vec_ok, [&](int64_t i, float v) {
    const float z = v / t;
    if (is_nan(z)) {
      mine.flags |= 1;
    } else if (is_pos_inf(z)) {
      mine.flags |= 2;
    } else if (!is_neg_inf(z)) {
      if (z > mine.m) {
        mine.s = mine.s * __expf(mine.m - z) + 1.f;
        mine.m = z;
      } else {
        mine.s += __expf(z - mine.m);
      }
      if (z > mine.best) {  // indices grow within a thread, so a strict > keeps the first argmax
        mine.best = z;
        mine.best_index = i;
      }
    }
  });
  const RowStats all = cub::BlockReduce<RowStats, kThreads>(sh.temp.stats).Reduce(mine, MergeRowStats());
  if (threadIdx.x == 0) sh.row = all;
  __syncthreads();
  const RowStats stats = sh.row;
  const float m = stats.m;
  if (stats.flags != 0 || is_neg_inf(m)) {
    if (threadIdx.x == 0) {
      tokens[row] = -1;
      logprobs[row] = filtered_logprobs[row] = __int_as_float(0x7fc00000);
    }
    return;
  }
  const float log_s = logf(stats.s);
  if (greedy) {
    if (threadIdx.x == 0) {
      tokens[row] = stats.best_index;
      logprobs[row] = stats.best - m - log_s;
      filtered_logprobs[row] = 0.f;
    }
    return;
  }

  __syncthreads();  // sh.temp is reused below
  uint32_t tau = 0;
  unsigned long long kept_fixed = 0;
  const bool k_on = top_k > 0 && top_k < V;
  if (k_on) {
    const double k = to_double(static_cast<unsigned long long>(top_k));  // top_k >= 0 (settings_ok)
    const SelectResult r = radix_select(x, V, vec_ok, t, m, 0u, false, k, 0.0, sh);
    tau = r.key;
    kept_fixed = r.mass_ge;
  }
  if (top_p < 1.0) {
    const SelectResult r = k_on ? radix_select(x, V, vec_ok, t, m, tau, true, top_p * to_double(kept_fixed), 0.0, sh)
                                : radix_select(x, V, vec_ok, t, m, tau, true, 0.0, top_p, sh);
    tau = r.key > tau ? r.key : tau;
  }

  uint64_t seed = rng.seed, offset = rng.offset;
  if (rng.seed_ptr) {
    seed = static_cast<uint64_t>(*rng.seed_ptr);
    offset = static_cast<uint64_t>(*rng.offset_ptr) + rng.offset_intragraph;
  }
  const uint2 key2 = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  Pick best{-INFINITY, 0.f, V, 0.f};
  for_each_in_row(x, V, vec_ok, [&](int64_t i, float v) {
    const float z = v / t;
    const float w = __expf(z - m);
    if (key_of(z) < tau || w < min_p || is_neg_inf(z)) return;
    best.kept_mass += w;
    const uint4 r = philox4x32_10(
        make_uint4(static_cast<uint32_t>(i), static_cast<uint32_t>(row), static_cast<uint32_t>(offset),
                   static_cast<uint32_t>(offset >> 32)),
        key2);
    const double u = (static_cast<double>(r.x) + 0.5) * 2.3283064365386963e-10;  // (0, 1)
    const double score = static_cast<double>(z) - log(-log(u));                   // z + Gumbel noise
    if (score > best.score) {
      best.score = score;
      best.z = z;
      best.index = i;
    }
  });
  __syncthreads();
  const Pick chosen = cub::BlockReduce<Pick, kThreads>(sh.temp.pick).Reduce(best, MergePick());
  if (threadIdx.x == 0) {
    tokens[row] = chosen.index;
    logprobs[row] = chosen.z - m - log_s;
    filtered_logprobs[row] = (chosen.z - m) - logf(chosen.kept_mass);
  }
}

// logits: [B, V] with row stride row_stride (elements); outputs [B] on the same device.
template <typename T>
cudaError_t launch_sample(const T* logits, int64_t B, int64_t V, int64_t row_stride, RowSettings settings,
                          PhiloxSeed rng, int64_t* tokens, float* logprobs, float* filtered_logprobs,
                          cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sample_kernel<T><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(logits, V, row_stride, settings, rng, tokens,
                                                                           logprobs, filtered_logprobs);
  return cudaGetLastError();
}

}  // namespace sampling
}  // namespace rlhf_ext

#ifdef RLHF_EXT_HEADER_SELFTEST
namespace rlhf_ext {
namespace sampling {
template cudaError_t launch_sample<float>(const float*, int64_t, int64_t, int64_t, RowSettings, PhiloxSeed, int64_t*,
                                          float*, float*, cudaStream_t);
template cudaError_t launch_sample<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, int64_t, RowSettings,
                                                  PhiloxSeed, int64_t*, float*, float*, cudaStream_t);
template cudaError_t launch_sample<__half>(const __half*, int64_t, int64_t, int64_t, RowSettings, PhiloxSeed, int64_t*,
                                           float*, float*, cudaStream_t);
}  // namespace sampling
}  // namespace rlhf_ext
#endif  // RLHF_EXT_HEADER_SELFTEST
