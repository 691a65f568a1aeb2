// Shared boundary checks for the rlhf_ext kernels. Every message names the argument, what was
// expected and what came, so a user reading the error knows which tensor to fix.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace rlhf_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
              name, ": expected a float32/bfloat16/float16/float64 tensor, got ", st);
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", shape_str(ref), " (the shape of ",
              ref_name, "), got ", shape_str(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
              ref_name, "), got one on ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* what) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-d tensor ", what, ", got shape ", shape_str(t));
}

// Boundary checks shared by the CPU kernels and the CUDA bindings (defined in the CPU kernel files).
void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                      double lam, const c10::optional<at::Tensor>& last_values);
void check_masked_inputs(const at::Tensor& x, const at::Tensor& mask);

}  // namespace rlhf_ext
