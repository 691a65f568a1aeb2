// Torch binding for the gather_logprobs CUDA kernels (csrc/cuda/logprobs.cuh): the same checks as the
// CPU ops (csrc/checks/logprobs.cpp), launches on the current stream, no host synchronisation.
//
// Every dtype and every strided layout the CPU ops take (float64 accumulates in double, as on CPU).
// Difference from CPU, by design: a label outside [0, V) cannot raise without a device->host sync, so
// it trips a device-side assert (as torch's nll_loss does).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks/checks.h"
#include "../kernels.h"
#include "binding.h"
#include "logprobs.cuh"

namespace rlhf_ext {
namespace {

namespace lp = rlhf_ext::cuda::logprobs;

// Where each row of a [..., V] tensor (unit last stride) starts, for any leading layout, without
// copying: up to kMaxRowLevels strided levels go in the RowLayout itself; a layout needing more gets
// an int64 offset table [rows] built on the device (O(rows), no sync), kept alive in `table`.
lp::RowLayout row_layout(const at::Tensor& t, at::Tensor& table) {
  lp::RowLayout layout;
  const int lead = static_cast<int>(t.dim()) - 1;
  if (cuda::make_row_layout(lead, t.sizes().data(), t.strides().data(), layout)) return layout;
  const auto opts = t.options().dtype(at::kLong);
  table = at::zeros({}, opts);
  for (int d = 0; d < lead; ++d) table = table.unsqueeze(-1) + at::arange(t.size(d), opts) * t.stride(d);
  table = table.reshape({-1}).contiguous();
  layout.table = table.const_data_ptr<int64_t>();
  return layout;
}

void check_cuda_shape(const at::Tensor& logits) {
  TORCH_CHECK(logits.numel() / logits.size(-1) <= lp::kMaxRows, "logits: expected at most ", lp::kMaxRows,
              " rows (prod(logits.shape[:-1])) on CUDA, got ", logits.numel() / logits.size(-1));
}

template <typename scalar_t>
void run_forward(const at::Tensor& logits, const lp::RowLayout& layout, const at::Tensor& labels, at::Tensor& logprobs,
                 at::Tensor& entropy, at::Tensor& lse, double temperature, int64_t ignore_index, bool with_entropy) {
  using T = cuda::device_t<scalar_t>;
  using A = acc_t<T>;
  const int64_t rows = labels.numel(), vocab = logits.size(-1);
  lp::ForwardParams<T> p{cuda::device_ptr<scalar_t>(logits), layout, rows, vocab,
                         labels.const_data_ptr<int64_t>(), logprobs.data_ptr<A>(), entropy.data_ptr<A>(),
                         lse.data_ptr<A>(), static_cast<A>(1.0 / temperature), ignore_index, with_entropy};
  const int splits = lp::forward_splits(vocab, static_cast<int>(sizeof(T)));
  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({lp::forward_workspace_size(rows, splits)}, logprobs.options());
  cuda::check_launch(lp::launch_forward<T>(p, splits, splits > 1 ? workspace.data_ptr<A>() : nullptr,
                                           c10::cuda::getCurrentCUDAStream()),
                     "logprobs_forward");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cuda(const at::Tensor& logits_in,
                                                                     const at::Tensor& labels_in, double temperature,
                                                                     int64_t ignore_index, bool with_entropy,
                                                                     bool /*inplace_backward: read by autograd*/) {
  check_logprobs_forward_inputs(logits_in, labels_in, temperature);
  check_cuda_shape(logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = last_dim_contiguous(logits_in);
  at::Tensor table;
  const lp::RowLayout layout = row_layout(logits, table);
  const at::Tensor labels = labels_in.contiguous();
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor logprobs = at::empty(labels.sizes(), opts);
  at::Tensor entropy = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward_cuda", [&] {
    run_forward<scalar_t>(logits, layout, labels, logprobs, entropy, lse, temperature, ignore_index, with_entropy);
  });
  return {logprobs, entropy, lse};
}

namespace {

template <typename scalar_t>
void run_backward(const at::Tensor& g_lp, const at::Tensor& g_h, const at::Tensor& logits,
                  const lp::RowLayout& in_layout, const at::Tensor& grad, const lp::RowLayout& out_layout,
                  const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                  int64_t ignore_index) {
  using T = cuda::device_t<scalar_t>;
  using A = acc_t<T>;
  lp::BackwardParams<T> p{cuda::device_ptr<scalar_t>(logits),
                          in_layout,
                          cuda::mutable_device_ptr<scalar_t>(grad),
                          out_layout,
                          labels.numel(),
                          logits.size(-1),
                          labels.const_data_ptr<int64_t>(),
                          g_lp.defined() ? g_lp.const_data_ptr<A>() : nullptr,
                          g_h.defined() ? g_h.const_data_ptr<A>() : nullptr,
                          lse.const_data_ptr<A>(),
                          entropy.const_data_ptr<A>(),
                          static_cast<A>(1.0 / temperature),
                          ignore_index};
  cuda::check_launch(lp::launch_backward<T>(p, c10::cuda::getCurrentCUDAStream()), "logprobs_backward");
}

void backward_into(const c10::optional<at::Tensor>& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const lp::RowLayout& in_layout, const at::Tensor& grad,
                   const lp::RowLayout& out_layout, const at::Tensor& labels_in, const at::Tensor& lse_in,
                   const at::Tensor& entropy_in, double temperature, int64_t ignore_index) {
  if (labels_in.numel() == 0) return;
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor entropy = entropy_in.contiguous();
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor g_lp, g_h;  // O(rows): expanding a broadcast grad or casting it costs nothing
  if (grad_logprobs.has_value()) g_lp = grad_logprobs->to(acc).contiguous();
  if (grad_entropy.has_value()) g_h = grad_entropy->to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward_cuda", [&] {
    run_backward<scalar_t>(g_lp, g_h, logits, in_layout, grad, out_layout, labels, lse, entropy, temperature,
                           ignore_index);
  });
}

}  // namespace

at::Tensor logprobs_backward_cuda(const c10::optional<at::Tensor>& grad_logprobs,
                                  const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                  const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                  double temperature, int64_t ignore_index) {
  check_logprobs_backward_inputs(grad_logprobs, grad_entropy, logits_in, labels, lse, entropy, temperature);
  check_cuda_shape(logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = last_dim_contiguous(logits_in);
  at::Tensor in_table, out_table;
  const lp::RowLayout in_layout = row_layout(logits, in_table);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());  // contiguous, like the fake
  const lp::RowLayout out_layout = row_layout(grad, out_table);
  backward_into(grad_logprobs, grad_entropy, logits, in_layout, grad, out_layout, labels, lse, entropy, temperature,
                ignore_index);
  return grad;
}

void logprobs_backward_inplace_cuda(const c10::optional<at::Tensor>& grad_logprobs,
                                    const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature, int64_t ignore_index) {
  check_logprobs_backward_inplace_inputs(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature);
  check_cuda_shape(logits);
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor table;
  const lp::RowLayout layout = row_layout(logits, table);
  backward_into(grad_logprobs, grad_entropy, logits, layout, logits, layout, labels, lse, entropy, temperature,
                ignore_index);
}

}  // namespace rlhf_ext
