// Boundary checks and input preparation of the gae op (CPU and CUDA share them).
#include <cmath>

#include "checks.h"

namespace rlhf_ext {

void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                      double lam, const c10::optional<at::Tensor>& last_values) {
  check_dim(rewards, 2, "rewards", "[B, T]");
  check_float(rewards, "rewards");
  check_float(values, "values");
  check_same_shape(values, rewards, "values", "rewards");
  check_same_shape(mask, rewards, "mask", "rewards");
  check_same_device(values, rewards, "values", "rewards");
  check_same_device(mask, rewards, "mask", "rewards");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "values: expected dtype ", rewards.scalar_type(),
              " (the dtype of rewards), got ", values.scalar_type());
  check_bool(mask, "mask");
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, "gamma: expected a finite value in [0, 1], got ",
              gamma);
  TORCH_CHECK(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, "lam: expected a finite value in [0, 1], got ", lam);
  if (last_values.has_value()) {
    const auto& lv = *last_values;
    check_dim(lv, 1, "last_values", "[B]");
    TORCH_CHECK(lv.size(0) == rewards.size(0), "last_values: expected shape [", rewards.size(0),
                "] (the batch of rewards), got ", shape_str(lv));
    check_same_device(lv, rewards, "last_values", "rewards");
    check_float(lv, "last_values");
  }
}

GaeInputs prepare_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                             double gamma, double lam, const c10::optional<at::Tensor>& last_values) {
  check_gae_inputs(rewards, values, mask, gamma, lam, last_values);
  GaeInputs in;
  in.rewards = rewards.contiguous();
  in.values = values.contiguous();
  in.mask = mask.contiguous();
  in.batch = rewards.size(0);
  in.length = rewards.size(1);
  const auto out_dtype = acc_dtype(rewards.scalar_type());
  in.advantages = at::empty({in.batch, in.length}, rewards.options().dtype(out_dtype));
  in.returns = at::empty({in.batch, in.length}, rewards.options().dtype(out_dtype));
  if (last_values.has_value()) in.last_values = last_values->to(out_dtype).contiguous();
  return in;
}

}  // namespace rlhf_ext
