// The accumulation type of every kernel, CPU and CUDA: float for float32, bfloat16 and float16 data, double
// for float64 (the test oracle's precision). Log-probs, entropies, statistics and workspaces have this type.
// Framework-free (types only), so the CUDA headers and the CPU row kernels share it.
#pragma once

namespace rlhf_ext {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

}  // namespace rlhf_ext
