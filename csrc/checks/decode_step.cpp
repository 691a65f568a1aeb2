// Boundary checks of the decode_step op (CPU only).
#include <cmath>
#include <string>

#include "checks.h"

namespace rlhf_ext {

namespace {
void check_cpu_float32(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a tensor on cpu (decode_step has only a CPU kernel), got one on ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected a float32 tensor, got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, std::initializer_list<int64_t> shape, const std::string& name,
                 const char* what) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, ": expected shape ", at::IntArrayRef(shape), " ", what,
              ", got ", shape_str(t));
}

int64_t panels(int64_t n) { return (n + kPackedPanel - 1) / kPackedPanel; }
}  // namespace

void check_decode_step_inputs(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& key_mask,
                              int64_t slot, at::TensorList weights, const at::Tensor& final_norm, int64_t num_heads,
                              double eps, double scaling) {
  check_cpu_float32(hidden, "hidden");
  check_dim(hidden, 2, "hidden", "[B, H]");
  const int64_t B = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(B > 0 && H > 0, "hidden: expected B and H > 0, got shape ", shape_str(hidden));
  check_cpu_float32(cos, "cos");
  check_dim(cos, 2, "cos", "[B, head_dim]");
  const int64_t D = cos.size(1);
  TORCH_CHECK(D > 0 && D % 2 == 0, "cos: expected an even head_dim > 0 in shape [B, head_dim], got ", shape_str(cos));
  check_shape(cos, {B, D}, "cos", "([B, head_dim], B from hidden)");
  check_cpu_float32(sin, "sin");
  check_shape(sin, {B, D}, "sin", "(the shape of cos)");
  check_cpu_float32(key_cache, "key_cache");
  check_dim(key_cache, 5, "key_cache", "[layers, B, kv_heads, capacity, head_dim]");
  const int64_t L = key_cache.size(0), KV = key_cache.size(2), C = key_cache.size(3);
  TORCH_CHECK(L > 0 && KV > 0 && C > 0 && key_cache.size(1) == B && key_cache.size(4) == D,
              "key_cache: expected shape [layers, ", B, ", kv_heads, capacity, ", D,
              "] (B from hidden, head_dim from cos; each size > 0), got ", shape_str(key_cache));
  TORCH_CHECK(key_cache.is_contiguous(), "key_cache: expected a contiguous tensor (the step writes into it)");
  check_cpu_float32(value_cache, "value_cache");
  check_same_shape(value_cache, key_cache, "value_cache", "key_cache");
  TORCH_CHECK(value_cache.is_contiguous(), "value_cache: expected a contiguous tensor (the step writes into it)");
  TORCH_CHECK(!key_cache.is_same(value_cache) && key_cache.data_ptr() != value_cache.data_ptr(),
              "value_cache: expected a tensor other than key_cache");
  TORCH_CHECK(key_mask.device().is_cpu(), "key_mask: expected a tensor on cpu, got one on ", key_mask.device());
  check_bool(key_mask, "key_mask");
  check_shape(key_mask, {B, C}, "key_mask", "([B, capacity], from key_cache)");
  TORCH_CHECK(slot >= 0 && slot < C, "slot: expected a cache slot in [0, ", C, ") (key_cache's capacity), got ", slot);
  const at::Tensor at_slot = key_mask.select(1, slot);
  TORCH_CHECK(at_slot.all().item<bool>(), "key_mask: expected True at slot ", slot,
              " in every row (the slot this step writes), got False in some row");
  TORCH_CHECK(num_heads > 0 && num_heads % KV == 0, "num_heads: expected a positive multiple of kv_heads = ", KV,
              " (key_cache's dim 2), got ", num_heads);
  TORCH_CHECK(weights.size() == static_cast<size_t>(6 * L), "weights: expected 6 tensors per layer, ", 6 * L,
              " for key_cache's ", L, " layers, got ", weights.size());
  TORCH_CHECK(weights[5].dim() == 3, "weights[5]: expected the packed down weight [panels, intermediate, 16], got ",
              "shape ", shape_str(weights[5]));
  const int64_t I = weights[5].size(1);
  const int64_t qkv = (num_heads + 2 * KV) * D;
  for (int64_t l = 0; l < L; ++l) {
    const auto name = [&](int i) { return "weights[" + std::to_string(6 * l + i) + "]"; };
    for (int i = 0; i < 6; ++i) check_cpu_float32(weights[6 * l + i], name(i));
    check_shape(weights[6 * l + 0], {H}, name(0), "(the input RMSNorm's weight [H])");
    check_shape(weights[6 * l + 1], {panels(qkv), H, kPackedPanel}, name(1),
                "(q, k, v weights stacked and packed: (num_heads + 2 kv_heads) head_dim outputs)");
    check_shape(weights[6 * l + 2], {panels(H), num_heads * D, kPackedPanel}, name(2), "(the packed o weight)");
    check_shape(weights[6 * l + 3], {H}, name(3), "(the post-attention RMSNorm's weight [H])");
    check_shape(weights[6 * l + 4], {panels(2 * I), H, kPackedPanel}, name(4),
                "(gate and up weights stacked and packed: 2 x intermediate outputs)");
    check_shape(weights[6 * l + 5], {panels(H), I, kPackedPanel}, name(5), "(the packed down weight)");
  }
  check_cpu_float32(final_norm, "final_norm");
  check_shape(final_norm, {H}, "final_norm", "(the final RMSNorm's weight [H])");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(scaling), "scaling: expected a finite value, got ", scaling);
}

}  // namespace rlhf_ext
