// Simulator harness entry points for csrc/cuda/logprobs.cuh (see sim_common.cuh for the calling convention).
// Logits are given as a torch view would be: a contiguous storage [n] and the view's element offset, leading
// sizes and strides ([lead_dims] int64, outermost first; the last dim has stride 1), or a per-row offset table
// ([rows] int64, relative to storage + offset) instead of the levels. acc is float32 for float32/bfloat16/float16
// logits and float64 for float64. rows = prod(lead_sizes).
//
// sim_logprobs_forward_<dtype>(storage, n, offset, lead_dims, lead_sizes, lead_strides, table or NULL,
//     labels [rows] int64, logprobs, entropy, lse [rows] acc (in/out), vocab, temperature, ignore_index,
//     with_entropy, splits) -> cudaError_t
//   splits <= 0: forward_splits(vocab, sizeof(T)), as the torch binding; > 1 forces the split + combine path.
// sim_logprobs_backward_<dtype>(storage (in/out), n, offset, lead_dims, lead_sizes, lead_strides, table or NULL,
//     grad [rows, vocab] (in/out) or NULL for the in-place backward (into the logits view), labels,
//     grad_logprobs or NULL, grad_entropy or NULL, lse, entropy [rows] acc, vocab, temperature, ignore_index)
// sim_logprobs_splits(vocab, elem_bytes, splits [1] int64 (out)): the forward split count the binding uses.
#include "logprobs.cuh"
#include "sim_common.cuh"

namespace {

namespace lp = rlhf_ext::cuda::logprobs;

int64_t lead_rows(int64_t lead_dims, const int64_t* sizes) {
  int64_t rows = 1;
  for (int64_t d = 0; d < lead_dims; ++d) rows *= sizes[d];
  return rows;
}

// The view's RowLayout: the table when one is given, else the collapsed levels (false: too many levels).
bool layout_of(int64_t lead_dims, const int64_t* sizes, const int64_t* strides, const int64_t* d_table,
               lp::RowLayout& layout) {
  if (d_table != nullptr) {
    layout = lp::RowLayout{};
    layout.table = d_table;
    return true;
  }
  return rlhf_ext::cuda::make_row_layout(static_cast<int>(lead_dims), sizes, strides, layout);
}

template <typename T, typename A = rlhf_ext::acc_t<T>>
int run_forward(const T* storage, int64_t n, int64_t offset, int64_t lead_dims, const int64_t* sizes,
                const int64_t* strides, const int64_t* table, const int64_t* labels, A* logprobs, A* entropy, A* lse,
                int64_t vocab, double temperature, int64_t ignore_index, int64_t with_entropy, int64_t splits) {
  rlhf_ext::sim::Scope s;
  const int64_t rows = lead_rows(lead_dims, sizes);
  const T* d_storage = s.in(storage, n);
  const int64_t* d_table = s.in(table, rows);
  const int64_t* d_labels = s.in(labels, rows);
  A* d_lp = s.inout(logprobs, rows);
  A* d_ent = s.inout(entropy, rows);
  A* d_lse = s.inout(lse, rows);
  if (!s.ok()) return s.finish();
  lp::RowLayout layout;
  if (!layout_of(lead_dims, sizes, strides, d_table, layout)) return s.finish(cudaErrorInvalidValue);
  const int n_splits = splits > 0 ? static_cast<int>(splits) : lp::forward_splits(vocab, sizeof(T));
  A* workspace = nullptr;
  if (n_splits > 1) s.check(cudaMalloc(&workspace, lp::forward_workspace_size(rows, n_splits) * sizeof(A)));
  if (!s.ok()) return s.finish();
  lp::ForwardParams<T> p{d_storage + offset, layout,  rows,        vocab, d_labels, d_lp, d_ent, d_lse,
                         static_cast<A>(1.0 / temperature), ignore_index, with_entropy != 0};
  const int code = s.finish(lp::launch_forward<T>(p, n_splits, workspace, nullptr));
  cudaFree(workspace);
  return code;
}

template <typename T, typename A = rlhf_ext::acc_t<T>>
int run_backward(T* storage, int64_t n, int64_t offset, int64_t lead_dims, const int64_t* sizes,
                 const int64_t* strides, const int64_t* table, T* grad, const int64_t* labels, const A* grad_logprobs,
                 const A* grad_entropy, const A* lse, const A* entropy, int64_t vocab, double temperature,
                 int64_t ignore_index) {
  rlhf_ext::sim::Scope s;
  const int64_t rows = lead_rows(lead_dims, sizes);
  T* d_storage = s.inout(storage, n);
  const int64_t* d_table = s.in(table, rows);
  T* d_grad = s.inout(grad, rows * vocab);
  const int64_t* d_labels = s.in(labels, rows);
  const A* d_glp = s.in(grad_logprobs, rows);
  const A* d_gh = s.in(grad_entropy, rows);
  const A* d_lse = s.in(lse, rows);
  const A* d_ent = s.in(entropy, rows);
  if (!s.ok()) return s.finish();
  lp::RowLayout in_layout, out_layout;
  if (!layout_of(lead_dims, sizes, strides, d_table, in_layout)) return s.finish(cudaErrorInvalidValue);
  const int64_t contiguous_sizes[1] = {rows}, contiguous_strides[1] = {vocab};
  if (grad != nullptr) rlhf_ext::cuda::make_row_layout(1, contiguous_sizes, contiguous_strides, out_layout);
  lp::BackwardParams<T> p{d_storage + offset,
                          in_layout,
                          grad != nullptr ? d_grad : d_storage + offset,
                          grad != nullptr ? out_layout : in_layout,
                          rows,
                          vocab,
                          d_labels,
                          d_glp,
                          d_gh,
                          d_lse,
                          d_ent,
                          static_cast<A>(1.0 / temperature),
                          ignore_index};
  return s.finish(lp::launch_backward<T>(p, nullptr));
}

}  // namespace

#define SIM_LOGPROBS(SUFFIX, T, ACC)                                                                              \
  extern "C" int sim_logprobs_forward_##SUFFIX(                                                                  \
      const T* storage, int64_t n, int64_t offset, int64_t lead_dims, const int64_t* sizes, const int64_t* strides, \
      const int64_t* table, const int64_t* labels, ACC* logprobs, ACC* entropy, ACC* lse, int64_t vocab,         \
      double temperature, int64_t ignore_index, int64_t with_entropy, int64_t splits) {                          \
    return run_forward<T>(storage, n, offset, lead_dims, sizes, strides, table, labels, logprobs, entropy, lse,  \
                          vocab, temperature, ignore_index, with_entropy, splits);                               \
  }                                                                                                              \
  extern "C" int sim_logprobs_backward_##SUFFIX(                                                                 \
      T* storage, int64_t n, int64_t offset, int64_t lead_dims, const int64_t* sizes, const int64_t* strides,    \
      const int64_t* table, T* grad, const int64_t* labels, const ACC* grad_logprobs, const ACC* grad_entropy,   \
      const ACC* lse, const ACC* entropy, int64_t vocab, double temperature, int64_t ignore_index) {             \
    return run_backward<T>(storage, n, offset, lead_dims, sizes, strides, table, grad, labels, grad_logprobs,    \
                           grad_entropy, lse, entropy, vocab, temperature, ignore_index);                        \
  }
SIM_LOGPROBS(f32, float, float)
SIM_LOGPROBS(f64, double, double)
SIM_LOGPROBS(bf16, __nv_bfloat16, float)
SIM_LOGPROBS(f16, __half, float)

extern "C" int sim_logprobs_splits(int64_t vocab, int64_t elem_bytes, int64_t* splits) {
  *splits = lp::forward_splits(vocab, static_cast<int>(elem_bytes));
  return 0;
}
