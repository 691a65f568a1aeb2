// compute-sanitizer driver for csrc/cuda/logprobs.cuh: forward (one split and several + combine, with and
// without entropy), backward out of place and in place, fp32 / bf16 / fp16, odd V and rows that do not
// start on a 16-byte boundary (row stride V + 3), one ignore_index row; checked on the host against a
// float64 log-softmax and its gradient dz_j = (g [j == label] - p_j (g + h (x_j - lse + H))) / T.
#include "driver.cuh"
#include "logprobs.cuh"

using namespace driver;
namespace lp = rlhf_ext::cuda::logprobs;

template <typename T>
void run(Checker& check, int64_t rows, int64_t V, int splits, bool with_entropy, bool in_place, unsigned seed) {
  const int64_t stride = V + 3;  // rows start unaligned
  const float temperature = 0.7f;
  const double tol = sizeof(T) == 4 ? 1e-4 : 2e-2;
  auto logits = normal<T>(rows * stride, 3.0, seed);
  std::vector<int64_t> labels(rows);
  for (int64_t r = 0; r < rows; ++r) labels[r] = (r * 7919 + seed) % V;
  labels[rows - 1] = -100;  // ignore_index
  std::vector<float> g(rows), h(rows);
  for (int64_t r = 0; r < rows; ++r) g[r] = 0.5f + 0.1f * r, h[r] = with_entropy ? 0.3f - 0.05f * r : 0.f;
  T* dlogits = upload(logits);
  const int64_t* dlabels = upload(labels);
  float *out_lp = scratch<float>(rows), *out_ent = scratch<float>(rows), *out_lse = scratch<float>(rows);
  float* workspace = splits > 1 ? scratch<float>(lp::forward_workspace_size(rows, splits)) : nullptr;
  const int64_t lead_sizes[1] = {rows}, lead_strides[1] = {stride};
  lp::RowLayout layout;
  if (!rlhf_ext::cuda::make_row_layout(1, lead_sizes, lead_strides, layout)) {
    check.close("row layout", 1.0, 0.0, 0.0);  // one level always fits: a failure here is a header bug
    return;
  }
  lp::ForwardParams<T> fwd{dlogits, layout, rows, V, dlabels, out_lp, out_ent, out_lse,
                           1.0f / temperature, -100, with_entropy};
  CK(lp::launch_forward<T>(fwd, splits, workspace, 0));
  T* grad = in_place ? dlogits : scratch<T>(rows * stride);
  lp::BackwardParams<T> bwd{dlogits, layout, grad, layout, rows, V, dlabels, upload(g),
                            with_entropy ? upload(h) : nullptr, out_lse, out_ent, 1.0f / temperature, -100};
  CK(lp::launch_backward<T>(bwd, 0));
  auto got_lp = download(out_lp, rows), got_ent = download(out_ent, rows);
  auto got_grad = download(grad, rows * stride);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> x(V);
    double m = -INFINITY, s = 0, w = 0;
    for (int64_t j = 0; j < V; ++j) x[j] = to_double(logits[r * stride + j]) / temperature, m = std::fmax(m, x[j]);
    for (int64_t j = 0; j < V; ++j) s += std::exp(x[j] - m), w += std::exp(x[j] - m) * (x[j] - m);
    const double lse = m + std::log(s), H = std::log(s) - w / s;
    const bool ignored = labels[r] == -100;
    check.close("logprob", got_lp[r], ignored ? 0.0 : x[labels[r]] - lse, tol);
    if (with_entropy) check.close("entropy", got_ent[r], ignored ? 0.0 : H, tol);
    for (int64_t j = 0; j < V; ++j) {
      const double p = std::exp(x[j] - lse);
      const double dz = (j == labels[r] ? g[r] : 0.0) - p * (g[r] + h[r] * (x[j] - lse + H));
      const double want = ignored ? 0.0 : dz / temperature;
      check.close("grad", to_double(got_grad[r * stride + j]), want, tol);
    }
  }
}

int main() {
  Checker check{"logprobs"};
  run<float>(check, 4, 1001, 1, true, false, 1);
  run<float>(check, 3, 5000, 3, true, false, 2);  // split rows + combine
  run<float>(check, 3, 5000, 2, false, true, 3);  // in-place backward
  run<__nv_bfloat16>(check, 3, 4099, 2, true, false, 4);
  run<__half>(check, 3, 777, 1, false, true, 5);
  return check.finish();
}
