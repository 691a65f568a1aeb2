// Helpers shared by the compute-sanitizer drivers in this folder: each driver is a small standalone program
// that calls the framework-free launchers of one csrc/cuda/<family>.cuh on cudaMalloc'd buffers of small,
// odd shapes, checks a few outputs against a host computation, and exits non-zero on any CUDA error or
// wrong value. They are what `make gpu-check` runs under `compute-sanitizer --tool memcheck|racecheck`
// (scripts/gpu_check.py); tests/test_gpu_check.py compiles them with nvcc and runs them under the simulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CK(call)                                                                                    \
  do {                                                                                              \
    cudaError_t err_ = (call);                                                                      \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)

namespace driver {

// Host values converted to the device element type (bf16/half conversions are host-callable).
template <typename T> inline T from_double(double x) { return static_cast<T>(x); }
template <> inline __half from_double<__half>(double x) { return __float2half(static_cast<float>(x)); }
template <> inline __nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16(static_cast<float>(x));
}
template <typename T> inline double to_double(T x) { return static_cast<double>(x); }
template <> inline double to_double<__half>(__half x) { return __half2float(x); }
template <> inline double to_double<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// A device copy of a host vector (freed at exit: the drivers are short-lived).
template <typename T>
T* upload(const std::vector<T>& host) {
  T* dev = nullptr;
  CK(cudaMalloc(&dev, host.size() * sizeof(T) + 16));  // +16: a 0-length vector still gets a valid pointer
  if (!host.empty()) CK(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return dev;
}

template <typename T>
std::vector<T> download(const T* dev, size_t n) {
  std::vector<T> host(n);
  CK(cudaDeviceSynchronize());
  if (n) CK(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

template <typename T>
T* scratch(size_t n) {
  T* dev = nullptr;
  CK(cudaMalloc(&dev, n * sizeof(T) + 16));
  CK(cudaMemset(dev, 0xff, n * sizeof(T) + 16));  // NaN / -1 garbage: unwritten outputs show
  return dev;
}

template <typename T>
std::vector<T> normal(size_t n, double scale, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<T> out(n);
  for (auto& v : out) v = from_double<T>(dist(gen));
  return out;
}

// Masks with holes, a run of holes, and an empty last row.
inline std::vector<char> holey_mask(int64_t B, int64_t T, unsigned seed) {
  std::mt19937 gen(seed);
  std::vector<char> m(B * T);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) m[b * T + t] = (b + 1 < B || B == 1) && (gen() % 5 != 0) && !(t >= 3 && t < 7);
  return m;
}

struct Checker {
  const char* family;
  int failures = 0;
  void close(const char* what, double got, double want, double tol) {
    if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
      ++failures;
      if (failures <= 5) std::fprintf(stderr, "%s: %s: got %.9g, want %.9g\n", family, what, got, want);
    }
  }
  int finish() {
    CK(cudaDeviceSynchronize());
    CK(cudaGetLastError());
    std::printf("%s driver: %s (%d mismatches)\n", family, failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
  }
};

}  // namespace driver
