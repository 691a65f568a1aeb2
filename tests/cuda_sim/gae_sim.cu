// Simulator harness entry points for csrc/cuda/gae.cuh (see sim_common.cuh for the calling convention).
// sim_gae_<dtype>(rewards [B, T], values [B, T], mask [B, T] bool, last_values [B] acc or NULL,
//                 advantages [B, T] acc (in/out), returns [B, T] acc (in/out), B, T, gamma, lam) -> cudaError_t
// acc is float32 for float32/bfloat16/float16 data and float64 for float64.
#include "gae.cuh"
#include "sim_common.cuh"

namespace {

template <typename T, typename acc_t = rlhf_ext::acc_t<T>>
int run_gae(const T* rewards, const T* values, const bool* mask, const acc_t* last_values, acc_t* advantages,
            acc_t* returns, int64_t B, int64_t T_, double gamma, double lam) {
  rlhf_ext::sim::Scope s;
  const int64_t n = B * T_;
  const T* d_rewards = s.in(rewards, n);
  const T* d_values = s.in(values, n);
  const bool* d_mask = s.in(mask, n);
  const acc_t* d_last = s.in(last_values, B);
  acc_t* d_adv = s.inout(advantages, n);
  acc_t* d_ret = s.inout(returns, n);
  if (!s.ok()) return s.finish();
  return s.finish(rlhf_ext::cuda::launch_gae<T>(d_rewards, d_values, d_mask, d_last, d_adv, d_ret, B, T_, gamma, lam,
                                                nullptr));
}

}  // namespace

#define SIM_GAE(SUFFIX, T, ACC)                                                                                  \
  extern "C" int sim_gae_##SUFFIX(const T* rewards, const T* values, const bool* mask, const ACC* last_values,   \
                                  ACC* advantages, ACC* returns, int64_t B, int64_t T_, double gamma, double lam) { \
    return run_gae<T>(rewards, values, mask, last_values, advantages, returns, B, T_, gamma, lam);               \
  }
SIM_GAE(f32, float, float)
SIM_GAE(f64, double, double)
SIM_GAE(bf16, __nv_bfloat16, float)
SIM_GAE(f16, __half, float)
