// Boundary checks of the masked_moments / masked_whiten ops (CPU and CUDA share them).
#include <cmath>

#include "checks.h"

namespace rlhf_ext {

void check_masked_inputs(const at::Tensor& x, const at::Tensor& mask) {
  check_float(x, "x");
  check_same_shape(mask, x, "mask", "x");
  check_same_device(mask, x, "mask", "x");
  check_bool(mask, "mask");
}

void check_masked_whiten_inputs(const at::Tensor& x, const at::Tensor& mask, double eps) {
  check_masked_inputs(x, mask);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
}

void check_whiten_count(double count, bool unbiased) {
  TORCH_CHECK(count > 0, "mask: selects no element (mask.sum() == 0); masked statistics are undefined");
  TORCH_CHECK(!unbiased || count > 1,
              "mask: selects a single element, so the unbiased variance is undefined; pass unbiased=False");
}

}  // namespace rlhf_ext
