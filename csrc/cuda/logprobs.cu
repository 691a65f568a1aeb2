// Torch binding for the gather_logprobs CUDA kernels (csrc/cuda/logprobs.cuh): the same checks as the
// CPU ops (csrc/logprobs.h), launches on the current stream, no host synchronisation.
//
// Differences from CPU, by design: float64 logits are CPU-only; a label outside [0, V) cannot raise
// without a device->host sync, so it trips a device-side assert (as torch's nll_loss does).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../common.h"
#include "../logprobs.h"
#include "logprobs.cuh"

namespace rlhf_ext {
namespace {

namespace lp = rlhf_ext::cuda::logprobs;

// Collapses the leading dims of a [..., V] tensor into at most two (size, stride) levels; false when
// they do not collapse (e.g. a 3-level slice), in which case the caller copies.
bool row_layout(const at::Tensor& t, lp::RowLayout& layout) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d)) {
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  if (dims.size() > 2) return false;
  if (dims.empty()) {
    layout = {1, 0, 0};
  } else if (dims.size() == 1) {
    layout = {dims[0].first, 0, dims[0].second};
  } else {
    layout = {dims[1].first, dims[0].second, dims[1].second};
  }
  return true;
}

// Cached per device: the split heuristic needs it on every call. (ATen/cuda/CUDAContext.h would give
// it too, but pulls in cuSPARSE/cuBLAS headers that a CUDA toolkit without them cannot compile.)
int multiprocessor_count(int device) {
  constexpr int kCached = 64;
  static int cache[kCached] = {0};  // a benign race: every writer stores the same value
  if (device >= 0 && device < kCached && cache[device] > 0) return cache[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kCached) cache[device] = count;
  return count;
}

void check_cuda_shape(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() != at::kDouble,
              "logits: float64 is supported on CPU only; on CUDA pass float32, bfloat16 or float16");
  TORCH_CHECK(logits.numel() / logits.size(-1) <= lp::kMaxRows, "logits: expected at most ", lp::kMaxRows,
              " rows (prod(logits.shape[:-1])) on CUDA, got ", logits.numel() / logits.size(-1));
}

// Last dim contiguous and leading dims expressible as a RowLayout, copying only when they are not.
at::Tensor readable_logits(const at::Tensor& logits, lp::RowLayout& layout) {
  at::Tensor t = (logits.stride(-1) == 1 || logits.size(-1) == 1) ? logits : logits.contiguous();
  if (!row_layout(t, layout)) {
    t = t.contiguous();
    row_layout(t, layout);
  }
  return t;
}

template <typename T>
void run_forward(const at::Tensor& logits, const lp::RowLayout& layout, const at::Tensor& labels, at::Tensor& logprobs,
                 at::Tensor& entropy, at::Tensor& lse, double temperature, int64_t ignore_index, bool with_entropy) {
  const int64_t rows = labels.numel(), vocab = logits.size(-1);
  lp::ForwardParams<T> p{static_cast<const T*>(logits.const_data_ptr()), layout, rows, vocab,
                         labels.const_data_ptr<int64_t>(), logprobs.data_ptr<float>(), entropy.data_ptr<float>(),
                         lse.data_ptr<float>(), static_cast<float>(1.0 / temperature), ignore_index, with_entropy};
  const int sms = multiprocessor_count(logits.get_device());
  const int splits = lp::forward_splits(rows, vocab, static_cast<int>(sizeof(T)), sms);
  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({lp::forward_workspace_floats(rows, splits)}, logprobs.options());
  C10_CUDA_CHECK(lp::launch_forward<T>(p, splits, splits > 1 ? workspace.data_ptr<float>() : nullptr,
                                       c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cuda(const at::Tensor& logits_in,
                                                                     const at::Tensor& labels_in, double temperature,
                                                                     int64_t ignore_index, bool with_entropy,
                                                                     bool /*inplace_backward: read by autograd*/) {
  check_logprobs_forward_inputs(logits_in, labels_in, temperature);
  check_cuda_shape(logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  lp::RowLayout layout;
  const at::Tensor logits = readable_logits(logits_in, layout);
  const at::Tensor labels = labels_in.contiguous();
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty(labels.sizes(), opts);
  at::Tensor entropy = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  switch (logits.scalar_type()) {
    case at::kFloat:
      run_forward<float>(logits, layout, labels, logprobs, entropy, lse, temperature, ignore_index, with_entropy);
      break;
    case at::kBFloat16:
      run_forward<__nv_bfloat16>(logits, layout, labels, logprobs, entropy, lse, temperature, ignore_index,
                                 with_entropy);
      break;
    default:  // kHalf (the checks admit nothing else)
      run_forward<__half>(logits, layout, labels, logprobs, entropy, lse, temperature, ignore_index, with_entropy);
  }
  return {logprobs, entropy, lse};
}

template <typename T>
void run_backward(const at::Tensor& g_lp, const at::Tensor& g_h, const at::Tensor& logits,
                  const lp::RowLayout& in_layout, const at::Tensor& grad, const lp::RowLayout& out_layout,
                  const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                  int64_t ignore_index) {
  lp::BackwardParams<T> p{static_cast<const T*>(logits.const_data_ptr()),
                          in_layout,
                          static_cast<T*>(grad.data_ptr()),
                          out_layout,
                          labels.numel(),
                          logits.size(-1),
                          labels.const_data_ptr<int64_t>(),
                          g_lp.defined() ? g_lp.const_data_ptr<float>() : nullptr,
                          g_h.defined() ? g_h.const_data_ptr<float>() : nullptr,
                          lse.const_data_ptr<float>(),
                          entropy.const_data_ptr<float>(),
                          static_cast<float>(1.0 / temperature),
                          ignore_index};
  C10_CUDA_CHECK(lp::launch_backward<T>(p, c10::cuda::getCurrentCUDAStream()));
}

void backward_into(const c10::optional<at::Tensor>& grad_logprobs, const c10::optional<at::Tensor>& grad_entropy,
                   const at::Tensor& logits, const lp::RowLayout& in_layout, const at::Tensor& grad,
                   const lp::RowLayout& out_layout, const at::Tensor& labels_in, const at::Tensor& lse_in,
                   const at::Tensor& entropy_in, double temperature, int64_t ignore_index) {
  if (labels_in.numel() == 0) return;
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor entropy = entropy_in.contiguous();
  at::Tensor g_lp, g_h;  // O(rows): expanding a broadcast grad or casting it costs nothing
  if (grad_logprobs.has_value()) g_lp = grad_logprobs->to(at::kFloat).contiguous();
  if (grad_entropy.has_value()) g_h = grad_entropy->to(at::kFloat).contiguous();
  switch (logits.scalar_type()) {
    case at::kFloat:
      run_backward<float>(g_lp, g_h, logits, in_layout, grad, out_layout, labels, lse, entropy, temperature,
                          ignore_index);
      break;
    case at::kBFloat16:
      run_backward<__nv_bfloat16>(g_lp, g_h, logits, in_layout, grad, out_layout, labels, lse, entropy, temperature,
                                  ignore_index);
      break;
    default:
      run_backward<__half>(g_lp, g_h, logits, in_layout, grad, out_layout, labels, lse, entropy, temperature,
                           ignore_index);
  }
}

at::Tensor logprobs_backward_cuda(const c10::optional<at::Tensor>& grad_logprobs,
                                  const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                  const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                  double temperature, int64_t ignore_index) {
  check_logprobs_backward_inputs(grad_logprobs, grad_entropy, logits_in, labels, lse, entropy, temperature);
  check_cuda_shape(logits_in);
  c10::cuda::CUDAGuard guard(logits_in.device());
  lp::RowLayout in_layout, out_layout;
  const at::Tensor logits = readable_logits(logits_in, in_layout);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());  // contiguous, like the fake
  row_layout(grad, out_layout);
  backward_into(grad_logprobs, grad_entropy, logits, in_layout, grad, out_layout, labels, lse, entropy, temperature,
                ignore_index);
  return grad;
}

void logprobs_backward_inplace_cuda(const c10::optional<at::Tensor>& grad_logprobs,
                                    const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                    double temperature, int64_t ignore_index) {
  check_logprobs_backward_inputs(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature);
  check_cuda_shape(logits);
  TORCH_CHECK(logits.stride(-1) == 1 || logits.size(-1) == 1,
              "logits: the in-place backward writes the gradient into logits, so its last dim must be contiguous "
              "(stride 1), got strides ", logits.strides());
  TORCH_CHECK(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "logits: the in-place backward writes the gradient into logits, so its rows must not share memory "
              "(got an expanded/overlapping tensor); use inplace_backward=False");
  lp::RowLayout layout;
  TORCH_CHECK(row_layout(logits, layout), "logits: the in-place backward on CUDA needs leading dims that collapse to "
              "at most two strided levels, got sizes ", logits.sizes(), " and strides ", logits.strides(),
              "; use inplace_backward=False");
  c10::cuda::CUDAGuard guard(logits.device());
  backward_into(grad_logprobs, grad_entropy, logits, layout, logits, layout, labels, lse, entropy, temperature,
                ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_ext, CUDA, m) {
  m.impl("logprobs_forward", &logprobs_forward_cuda);
  m.impl("logprobs_backward", &logprobs_backward_cuda);
  m.impl("logprobs_backward_inplace", &logprobs_backward_inplace_cuda);
}

}  // namespace rlhf_ext
