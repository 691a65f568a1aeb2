// Boundary checks of the sample op (CPU and CUDA share them): shapes, dtypes, devices and the scalar settings.
#include <cmath>

#include "checks.h"

namespace rlhf_ext {

void check_sample_inputs(const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
                         const c10::optional<at::Tensor>& row_temperature, const c10::optional<at::Tensor>& row_top_k,
                         const c10::optional<at::Tensor>& row_top_p, const c10::optional<at::Tensor>& row_min_p) {
  check_dim(logits, 2, "logits", "[B, V]");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "logits: expected a float32/bfloat16/float16 tensor, got ", st);
  TORCH_CHECK(logits.size(1) >= 1, "logits: expected a vocabulary of at least one token, got shape ",
              shape_str(logits));
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31),
              "logits: vocabulary sizes of 2^31 or more are not supported, got ", logits.size(1));
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0, "temperature: expected a finite value >= 0, got ",
              temperature);
  TORCH_CHECK(top_k >= 0, "top_k: expected a value >= 0 (0 = off), got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "top_p: expected a value in (0, 1] (1 = off), got ", top_p);
  TORCH_CHECK(min_p >= 0 && min_p <= 1, "min_p: expected a value in [0, 1] (0 = off), got ", min_p);
  const int64_t B = logits.size(0);
  auto check_row = [&](const c10::optional<at::Tensor>& t, const char* name, bool integral) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, name, ": expected a per-row tensor of shape [", B,
                "] (the batch of logits), got shape ", shape_str(*t));
    check_same_device(*t, logits, name, "logits");
    const bool is_int = at::isIntegralType(t->scalar_type(), /*includeBool=*/false);
    TORCH_CHECK(integral ? is_int : at::isFloatingType(t->scalar_type()), name, ": expected ",
                integral ? "an integer" : "a floating-point", " tensor, got ", t->scalar_type());
  };
  check_row(row_temperature, "temperature", false);
  check_row(row_top_k, "top_k", true);
  check_row(row_top_p, "top_p", false);
  check_row(row_min_p, "min_p", false);
}

}  // namespace rlhf_ext
