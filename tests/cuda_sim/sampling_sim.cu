// Simulator harness entry points for csrc/cuda/sampling.cuh (calling convention: sim_common.cuh).
//   sim_sample_<dtype>(logits [first + (B - 1) * row_stride + V] (row b starts at first + b * row_stride; a
//       `first` that is not a multiple of 16 bytes takes the unaligned path), first, B, V, row_stride,
//       row_temperature [B] float or NULL, row_top_k [B] int64 or NULL, row_top_p [B] double or NULL,
//       row_min_p [B] float or NULL, temperature, top_k, top_p, min_p,
//       seed, offset, device_seed [2] int64 (seed, offset) or NULL, offset_intragraph,
//       tokens [B] int64 (in/out), logprobs [B] float (in/out), filtered_logprobs [B] float (in/out))
//     With device_seed the kernel reads seed and offset from device memory (+ offset_intragraph), as under
//     CUDA-graph capture; otherwise it takes seed and offset by value.
#include "sampling.cuh"
#include "sim_common.cuh"

namespace {

template <typename T>
int run_sample(const T* logits, int64_t first, int64_t B, int64_t V, int64_t row_stride, const float* row_temperature,
               const int64_t* row_top_k, const double* row_top_p, const float* row_min_p, double temperature,
               int64_t top_k, double top_p, double min_p, int64_t seed, int64_t offset, const int64_t* device_seed,
               int64_t offset_intragraph, int64_t* tokens, float* logprobs, float* filtered_logprobs) {
  namespace smp = rlhf_ext::sampling;
  rlhf_ext::sim::Scope s;
  const int64_t numel = B > 0 ? first + (B - 1) * row_stride + V : first;
  const T* d_logits = s.in(logits, numel);
  smp::RowSettings settings{};
  settings.temperature = s.in(row_temperature, B);
  settings.top_k = s.in(row_top_k, B);
  settings.top_p = s.in(row_top_p, B);
  settings.min_p = s.in(row_min_p, B);
  settings.temperature_value = static_cast<float>(temperature);
  settings.top_k_value = top_k;
  settings.top_p_value = top_p;
  settings.min_p_value = static_cast<float>(min_p);
  smp::PhiloxSeed rng{};
  rng.seed = static_cast<uint64_t>(seed);
  rng.offset = static_cast<uint64_t>(offset);
  const int64_t* d_seed = s.in(device_seed, 2);
  if (d_seed != nullptr) {
    rng.seed_ptr = d_seed;
    rng.offset_ptr = d_seed + 1;
    rng.offset_intragraph = static_cast<uint64_t>(offset_intragraph);
  }
  int64_t* d_tokens = s.inout(tokens, B);
  float* d_logprobs = s.inout(logprobs, B);
  float* d_filtered = s.inout(filtered_logprobs, B);
  if (!s.ok()) return s.finish();
  return s.finish(smp::launch_sample<T>(d_logits + first, B, V, row_stride, settings, rng, d_tokens, d_logprobs,
                                        d_filtered, nullptr));
}

}  // namespace

#define SIM_SAMPLE(SUFFIX, T)                                                                                      \
  extern "C" int sim_sample_##SUFFIX(const T* logits, int64_t first, int64_t B, int64_t V, int64_t row_stride,     \
                                     const float* row_temperature, const int64_t* row_top_k,                       \
                                     const double* row_top_p, const float* row_min_p, double temperature,          \
                                     int64_t top_k, double top_p, double min_p, int64_t seed, int64_t offset,      \
                                     const int64_t* device_seed, int64_t offset_intragraph, int64_t* tokens,       \
                                     float* logprobs, float* filtered_logprobs) {                                  \
    return run_sample<T>(logits, first, B, V, row_stride, row_temperature, row_top_k, row_top_p, row_min_p,       \
                         temperature, top_k, top_p, min_p, seed, offset, device_seed, offset_intragraph, tokens,   \
                         logprobs, filtered_logprobs);                                                             \
  }
SIM_SAMPLE(f32, float)
SIM_SAMPLE(bf16, __nv_bfloat16)
SIM_SAMPLE(f16, __half)
