// Boundary checks of the pack_linear_weight / packed_linear ops (CPU only).
#include "checks.h"

namespace rlhf_ext {

namespace {
void check_cpu_float32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name,
              ": expected a tensor on cpu (packed_linear has only a CPU kernel), got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected a float32 tensor, got ", t.scalar_type());
}
}  // namespace

void check_pack_linear_weight_inputs(const at::Tensor& weight) {
  check_cpu_float32(weight, "weight");
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "weight: expected out_features and in_features > 0, got shape ",
              shape_str(weight));
}

void check_packed_linear_inputs(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                                const c10::optional<at::Tensor>& bias) {
  check_cpu_float32(input, "input");
  check_dim(input, 2, "input", "[rows, in_features]");
  check_cpu_float32(packed, "packed");
  check_dim(packed, 3, "packed", "[panels, in_features, 16] (from pack_linear_weight)");
  TORCH_CHECK(packed.size(2) == kPackedPanel, "packed: expected shape [panels, in_features, 16] (from ",
              "pack_linear_weight), got ", shape_str(packed));
  TORCH_CHECK(packed.size(1) == input.size(1), "packed: expected in_features ", input.size(1),
              " (input's last dimension), got shape ", shape_str(packed));
  const int64_t panels = (out_features + kPackedPanel - 1) / kPackedPanel;
  TORCH_CHECK(out_features > 0 && packed.size(0) == panels, "out_features: expected a value that packed's ",
              packed.size(0), " panels of 16 hold (", (packed.size(0) - 1) * kPackedPanel + 1, " to ",
              packed.size(0) * kPackedPanel, "), got ", out_features);
  if (bias.has_value()) {
    check_cpu_float32(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias: expected shape [", out_features,
                "] (out_features), got ", shape_str(*bias));
  }
}

}  // namespace rlhf_ext
