// Shared by the simulator harness libraries tests/cuda_sim/<family>_sim.cu: host arrays in, host arrays out.
//
// Each entry point (extern "C", scalars as int64_t / double so tests/sim_harness.py can call any of them the
// same way) opens a Scope, asks it for device copies of its host arrays, launches a framework-free launcher of
// csrc/cuda/<family>.cuh and returns scope.finish(launch_error): it synchronises, copies the in/out arrays
// back to the host and returns the first CUDA error as an int (0 = success).
//
// Every device buffer sits between two guard zones filled with a byte pattern; finish() checks them after the
// kernels ran and returns kGuardClobbered if any byte changed: the simulator does not fault on out-of-bounds
// accesses, so this is how a write past an array's end shows up in a test.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace rlhf_ext {
namespace sim {

constexpr int kGuardClobbered = 10001;   // a kernel wrote outside a buffer (see the file comment)
constexpr size_t kGuardBytes = 256;      // per side; a multiple of 16 keeps the arrays 16-byte aligned
constexpr unsigned char kGuardByte = 0xA5;

class Scope {
 public:
  Scope() = default;
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  ~Scope() {
    for (const Buffer& b : buffers_) cudaFree(b.base);
  }

  // Device copy of host[0, n) (nullptr stays nullptr: optional inputs); inout() arrays are also copied
  // back to the host by finish().
  template <typename T>
  T* in(const T* host, int64_t n) { return static_cast<T*>(add(host, n * sizeof(T), false)); }
  template <typename T>
  T* inout(T* host, int64_t n) { return static_cast<T*>(add(host, n * sizeof(T), true)); }

  // False once an allocation or copy failed: do not launch then (the pointers may be nullptr).
  bool ok() const { return error_ == cudaSuccess; }

  // Records the first error (launchers return cudaGetLastError()).
  void check(cudaError_t e) {
    if (error_ == cudaSuccess && e != cudaSuccess) error_ = e;
  }

  int finish(cudaError_t launch_error = cudaSuccess) {
    check(launch_error);
    check(cudaDeviceSynchronize());
    if (error_ != cudaSuccess) return static_cast<int>(error_);
    std::vector<unsigned char> guard(kGuardBytes);
    for (const Buffer& b : buffers_) {
      for (int side = 0; side < 2; ++side) {
        const unsigned char* zone = b.base + (side == 0 ? 0 : kGuardBytes + b.bytes);
        check(cudaMemcpy(guard.data(), zone, kGuardBytes, cudaMemcpyDeviceToHost));
        for (unsigned char c : guard) {
          if (c != kGuardByte && error_ == cudaSuccess) return kGuardClobbered;
        }
      }
      if (b.copy_back) check(cudaMemcpy(b.host, b.base + kGuardBytes, b.bytes, cudaMemcpyDeviceToHost));
    }
    return static_cast<int>(error_);
  }

 private:
  struct Buffer {
    unsigned char* base;
    size_t bytes;
    void* host;
    bool copy_back;
  };

  void* add(const void* host, size_t bytes, bool copy_back) {
    if (host == nullptr || error_ != cudaSuccess) return nullptr;
    unsigned char* base = nullptr;
    check(cudaMalloc(&base, bytes + 2 * kGuardBytes));
    if (error_ != cudaSuccess) return nullptr;
    buffers_.push_back({base, bytes, const_cast<void*>(host), copy_back});
    check(cudaMemset(base, kGuardByte, bytes + 2 * kGuardBytes));
    if (bytes > 0) check(cudaMemcpy(base + kGuardBytes, host, bytes, cudaMemcpyHostToDevice));
    return base + kGuardBytes;
  }

  std::vector<Buffer> buffers_;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace sim
}  // namespace rlhf_ext

// The harness turns error codes into names through this (one definition per harness library). Not
// cudaGetErrorString: the simulator's only reports its own last error.
extern "C" const char* sim_error_string(int code) {
#define RLHF_SIM_ERROR_NAME(e) \
  case e:                      \
    return #e;
  switch (code) {
    RLHF_SIM_ERROR_NAME(cudaErrorInvalidValue)
    RLHF_SIM_ERROR_NAME(cudaErrorMemoryAllocation)
    RLHF_SIM_ERROR_NAME(cudaErrorInitializationError)
    RLHF_SIM_ERROR_NAME(cudaErrorLaunchOutOfResources)
    RLHF_SIM_ERROR_NAME(cudaErrorInvalidConfiguration)
    RLHF_SIM_ERROR_NAME(cudaErrorInvalidDeviceFunction)
    RLHF_SIM_ERROR_NAME(cudaErrorNoDevice)
    RLHF_SIM_ERROR_NAME(cudaErrorInvalidDevice)
    RLHF_SIM_ERROR_NAME(cudaErrorNoKernelImageForDevice)
    RLHF_SIM_ERROR_NAME(cudaErrorIllegalAddress)
    RLHF_SIM_ERROR_NAME(cudaErrorLaunchFailure)
    RLHF_SIM_ERROR_NAME(cudaErrorNotSupported)
    RLHF_SIM_ERROR_NAME(cudaErrorUnknown)
    case rlhf_ext::sim::kGuardClobbered:
      return "a kernel wrote outside a buffer (guard zone clobbered)";
    default:
      return "a cudaError_t without a name here (see driver_types.h)";
  }
#undef RLHF_SIM_ERROR_NAME
}
