// Generalised Advantage Estimation on CPU: parallel over rows, one tight reverse scan per row.
//
// Semantics (multi-turn safe): positions where mask is false are skipped. The bootstrap value and
// the running advantage carry across them unchanged and the outputs there are 0. The value after a
// row's last valid token is last_values[b] (0 when not given). returns = advantages + values.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace rlhf_ext {

void check_gae_inputs(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
                      double gamma, double lam, const c10::optional<at::Tensor>& last_values) {
  check_dim(rewards, 2, "rewards", "[B, T]");
  check_float(rewards, "rewards");
  check_float(values, "values");
  check_same_shape(values, rewards, "values", "rewards");
  check_same_shape(mask, rewards, "mask", "rewards");
  check_same_device(values, rewards, "values", "rewards");
  check_same_device(mask, rewards, "mask", "rewards");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "values: expected dtype ",
              rewards.scalar_type(), " (the dtype of rewards), got ", values.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask: expected a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, "gamma: expected a finite value in [0, 1], got ", gamma);
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

namespace {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards_in, const at::Tensor& values_in,
                                           const at::Tensor& mask_in, double gamma, double lam,
                                           const c10::optional<at::Tensor>& last_values_in) {
  check_gae_inputs(rewards_in, values_in, mask_in, gamma, lam, last_values_in);
  auto rewards = rewards_in.contiguous();
  auto values = values_in.contiguous();
  auto mask = mask_in.contiguous();
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto advantages = at::empty({B, T}, rewards.options().dtype(out_dtype));
  auto returns = at::empty({B, T}, rewards.options().dtype(out_dtype));
  at::Tensor last_values;
  if (last_values_in.has_value()) last_values = last_values_in->to(out_dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rewards.scalar_type(), "gae_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    const bool* m = mask.data_ptr<bool>();
    const acc_t g = static_cast<acc_t>(gamma);
    const acc_t gl = static_cast<acc_t>(gamma * lam);
    // Both outputs share the accumulation type for double and float inputs; for bf16/fp16 it is float.
    AT_DISPATCH_FLOATING_TYPES(advantages.scalar_type(), "gae_cpu_out", [&] {
      using out_t = scalar_t;
      out_t* adv = advantages.data_ptr<out_t>();
      out_t* ret = returns.data_ptr<out_t>();
      const out_t* lv = last_values.defined() ? last_values.data_ptr<out_t>() : nullptr;
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t off = b * T;
          acc_t next_value = lv ? static_cast<acc_t>(lv[b]) : acc_t(0);
          acc_t running = 0;
          for (int64_t t = T - 1; t >= 0; --t) {
            if (!m[off + t]) {
              adv[off + t] = 0;
              ret[off + t] = 0;
              continue;
            }
            const acc_t value = static_cast<acc_t>(v[off + t]);
            const acc_t delta = static_cast<acc_t>(r[off + t]) + g * next_value - value;
            running = delta + gl * running;
            adv[off + t] = static_cast<out_t>(running);
            ret[off + t] = static_cast<out_t>(running + value);
            next_value = value;
          }
        }
      });
    });
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CPU, m) { m.impl("gae", &gae_cpu); }

}  // namespace rlhf_ext
