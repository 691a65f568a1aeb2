// Entry points that check the harness itself (tests/test_cuda_sim_harness.py): that a result comes back, and
// that an out-of-bounds write, an error code, a crashed and a hung worker all end in a readable failure.
#include <cstdlib>
#include <unistd.h>

#include "sim_common.cuh"

namespace {

__global__ void scale_kernel(const float* x, float* y, int64_t n, float factor, int64_t extra) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n + extra) y[i] = x[i < n ? i : 0] * factor;  // extra > 0 writes past the end of y
}

}  // namespace

// y[i] = factor * x[i] for i < n; with extra > 0 also y[n .. n + extra) (an out-of-bounds write).
extern "C" int sim_harness_scale(const float* x, float* y, int64_t n, double factor, int64_t extra) {
  rlhf_ext::sim::Scope s;
  const float* d_x = s.in(x, n);
  float* d_y = s.inout(y, n);
  if (!s.ok()) return s.finish();
  scale_kernel<<<static_cast<unsigned>((n + extra + 127) / 128), 128>>>(d_x, d_y, n, static_cast<float>(factor), extra);
  return s.finish(cudaGetLastError());
}

extern "C" int sim_harness_return(int64_t code) { return static_cast<int>(code); }

extern "C" int sim_harness_abort() { std::abort(); }

extern "C" int sim_harness_sleep(int64_t seconds) {
  sleep(static_cast<unsigned>(seconds));
  return 0;
}
