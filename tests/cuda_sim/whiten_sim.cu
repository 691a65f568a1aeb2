// Simulator harness entry points for csrc/cuda/whiten.cuh (calling convention: sim_common.cuh). S is the
// statistics type: float32 for float32/bfloat16/float16 data, float64 for float64.
//   sim_masked_moments_<dtype>(x [numel], mask [numel] bool, numel,
//       partials [3 * moments_num_segments(numel)] double (in/out), out [3] S (in/out))
//     runs the partial kernel (one block per 16384-element segment) and the combine kernel; afterwards
//     partials holds each segment's (count, mean, M2) and out the merged (count, mean, M2).
//   sim_masked_whiten_<dtype>(x, mask, moments [3] S, numel, shift_mean, unbiased, eps, out [numel] S (in/out))
//   sim_moments_num_segments(numel) -> the number of segments
#include "sim_common.cuh"
#include "whiten.cuh"

#define SIM_WHITEN(SUFFIX, T, S)                                                                                   \
  extern "C" int sim_masked_moments_##SUFFIX(const T* x, const bool* mask, int64_t numel, double* partials,        \
                                             S* out) {                                                             \
    rlhf_ext::sim::Scope s;                                                                                        \
    const T* d_x = s.in(x, numel);                                                                                 \
    const bool* d_mask = s.in(mask, numel);                                                                        \
    double* d_partials = s.inout(partials, 3 * rlhf_ext::cuda::moments_num_segments(numel));                      \
    S* d_out = s.inout(out, 3);                                                                                    \
    if (!s.ok()) return s.finish();                                                                                \
    return s.finish(rlhf_ext::cuda::launch_masked_moments<T, S>(d_x, d_mask, numel, d_partials, d_out, nullptr)); \
  }                                                                                                                \
  extern "C" int sim_masked_whiten_##SUFFIX(const T* x, const bool* mask, const S* moments, int64_t numel,         \
                                            int64_t shift_mean, int64_t unbiased, double eps, S* out) {            \
    rlhf_ext::sim::Scope s;                                                                                        \
    const T* d_x = s.in(x, numel);                                                                                 \
    const bool* d_mask = s.in(mask, numel);                                                                        \
    const S* d_moments = s.in(moments, 3);                                                                         \
    S* d_out = s.inout(out, numel);                                                                                \
    if (!s.ok()) return s.finish();                                                                                \
    return s.finish(rlhf_ext::cuda::launch_masked_whiten<T, S>(d_x, d_mask, d_moments, numel, shift_mean != 0,    \
                                                               unbiased != 0, eps, d_out, nullptr));               \
  }
SIM_WHITEN(f32, float, float)
SIM_WHITEN(f64, double, double)
SIM_WHITEN(bf16, __nv_bfloat16, float)
SIM_WHITEN(f16, __half, float)

extern "C" int sim_moments_num_segments(int64_t numel) { return rlhf_ext::cuda::moments_num_segments(numel); }
