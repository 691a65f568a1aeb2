// The packed product on plain pointers, for other CPU kernels (csrc/cpu/decode_step.cpp) that chain products
// without building a tensor per call. Layout and guarantees: csrc/cpu/packed_linear.cpp.
#pragma once

#include <cstdint>

namespace rlhf_ext {

// c[M, N] = a[M, K] @ weight^T (+ bias[N]) with `w` the weight packed by pack_linear_weight ([ceil(N / 16), K, 16]);
// every pointer contiguous; parallel over the panels (at::parallel_for), each output one k-ordered sum.
void packed_matmul(const float* a, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* c);

}  // namespace rlhf_ext
