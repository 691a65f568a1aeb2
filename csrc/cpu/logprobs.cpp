// gather_logprobs on CPU: log_softmax(logits / T)[label], the entropy of softmax(logits / T) and the
// per-row log-sum-exp, in one pass over each row, and the backward in one more. No [..., V] temporary.
//
// This file holds the row layout and the threading (at::parallel_for over rows); the boundary checks are
// csrc/checks/logprobs.cpp, and the row kernels (csrc/cpu/logprobs_rows.h) are compiled per vector ISA and
// the best one this CPU supports is picked once by cpu_isa() (csrc/cpu/isa.h).
//
// Logits may be any strided [..., V] tensor whose last dim is contiguous (e.g. logits[:, :-1] of a
// [B, L, V] output): rows are addressed through an O(N) offset table, never copied.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../checks/checks.h"
#include "../kernels.h"
#include "isa.h"
#include "logprobs_kernels.h"

namespace rlhf_ext {

namespace {

using namespace logprobs_cpu;

// kernels_avx2() / kernels_avx512() are nullptr where this build has no such variant; cpu_isa() then never
// names them (csrc/cpu/isa.h).
const KernelTable& kernels() {
  static const KernelTable* table = cpu::for_isa(cpu::cpu_isa(), kernels_default(), kernels_avx2(), kernels_avx512());
  return *table;
}

ForwardFn<float> forward_fn(const KernelTable& k, float*) { return k.forward_f32; }
ForwardFn<double> forward_fn(const KernelTable& k, double*) { return k.forward_f64; }
ForwardFn<c10::BFloat16> forward_fn(const KernelTable& k, c10::BFloat16*) { return k.forward_bf16; }
ForwardFn<c10::Half> forward_fn(const KernelTable& k, c10::Half*) { return k.forward_f16; }
BackwardFn<float> backward_fn(const KernelTable& k, float*) { return k.backward_f32; }
BackwardFn<double> backward_fn(const KernelTable& k, double*) { return k.backward_f64; }
BackwardFn<c10::BFloat16> backward_fn(const KernelTable& k, c10::BFloat16*) { return k.backward_bf16; }
BackwardFn<c10::Half> backward_fn(const KernelTable& k, c10::Half*) { return k.backward_f16; }

// Element offset of each row of a [..., V] tensor whose last dim has stride 1.
std::vector<int64_t> row_offsets(const at::Tensor& t) {
  const int64_t lead = t.dim() - 1;
  const int64_t rows = t.numel() / t.size(-1);
  std::vector<int64_t> offsets(rows);
  std::vector<int64_t> index(lead, 0);
  int64_t offset = 0;
  for (int64_t r = 0; r < rows; ++r) {
    offsets[r] = offset;
    for (int64_t d = lead - 1; d >= 0; --d) {  // odometer increment over the leading dims
      offset += t.stride(d);
      if (++index[d] < t.size(d)) break;
      offset -= t.stride(d) * t.size(d);
      index[d] = 0;
    }
  }
  return offsets;
}

// Labels must be ignore_index or a valid column; anything else would read outside the row.
void check_label_values(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t n = labels.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = lab[i];
    TORCH_CHECK(y == ignore_index || (y >= 0 && y < vocab), "labels: expected values in [0, ", vocab,
                ") (the vocabulary size) or ignore_index=", ignore_index, ", got ", y, " at flat position ", i);
  }
}

// Rows per parallel task: ~64K logits (~50 us of online softmax) each, so a call of a row or two (V = 32000) runs on
// the calling thread.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 65536 / vocab); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cpu(const at::Tensor& logits_in,
                                                                    const at::Tensor& labels_in, double temperature,
                                                                    int64_t ignore_index, bool with_entropy,
                                                                    bool /*inplace_backward: read by autograd*/) {
  check_logprobs_forward_inputs(logits_in, labels_in, temperature);
  const at::Tensor logits = last_dim_contiguous(logits_in);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t vocab = logits.size(-1);
  check_label_values(labels, vocab, ignore_index);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor logprobs = at::empty(labels.sizes(), opts);
  at::Tensor entropy = at::empty(labels.sizes(), opts);
  at::Tensor lse = at::empty(labels.sizes(), opts);
  const int64_t rows = labels.numel();
  if (rows == 0) return {logprobs, entropy, lse};
  const std::vector<int64_t> offsets = row_offsets(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    ForwardArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(), offsets.data(), labels.const_data_ptr<int64_t>(),
                               logprobs.data_ptr<acc>(), entropy.data_ptr<acc>(), lse.data_ptr<acc>(),
                               vocab, ignore_index, static_cast<acc>(1.0 / temperature), with_entropy};
    const auto fn = forward_fn(kernels(), static_cast<scalar_t*>(nullptr));
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  });
  return {logprobs, entropy, lse};
}

namespace {

// Writes d(loss)/d(logits) into `grad` (which may be `logits` itself).
void logprobs_backward_into(const c10::optional<at::Tensor>& grad_logprobs,
                            const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                            const at::Tensor& labels_in, const at::Tensor& lse_in, const at::Tensor& entropy_in,
                            double temperature, int64_t ignore_index, const at::Tensor& grad) {
  const int64_t vocab = logits.size(-1);
  const at::Tensor labels = labels_in.contiguous();
  check_label_values(labels, vocab, ignore_index);
  const int64_t rows = labels.numel();
  if (rows == 0) return;
  const auto out_dtype = acc_dtype(logits.scalar_type());
  // Per-row inputs are O(N): making them contiguous (and expanding a broadcast grad) costs nothing.
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor entropy = entropy_in.contiguous();
  at::Tensor g_lp, g_h;
  if (grad_logprobs.has_value()) g_lp = grad_logprobs->to(out_dtype).contiguous();
  if (grad_entropy.has_value()) g_h = grad_entropy->to(out_dtype).contiguous();
  const std::vector<int64_t> in_offsets = row_offsets(logits);
  const std::vector<int64_t> out_offsets = grad.is_same(logits) ? std::vector<int64_t>() : row_offsets(grad);
  const int64_t* out_off = grad.is_same(logits) ? in_offsets.data() : out_offsets.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    BackwardArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(),
                                in_offsets.data(),
                                grad.data_ptr<scalar_t>(),
                                out_off,
                                labels.const_data_ptr<int64_t>(),
                                g_lp.defined() ? g_lp.const_data_ptr<acc>() : nullptr,
                                g_h.defined() ? g_h.const_data_ptr<acc>() : nullptr,
                                lse.const_data_ptr<acc>(),
                                entropy.const_data_ptr<acc>(),
                                vocab,
                                ignore_index,
                                static_cast<acc>(1.0 / temperature)};
    const auto fn = backward_fn(kernels(), static_cast<scalar_t*>(nullptr));
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  });
}

// The out-of-place backward writes a fresh [..., V] buffer that nothing has touched yet; first-touch
// page faults then cost more than the kernel itself (about 1 s per GB of 4 KiB pages on a VM, 0.2 s
// with 2 MiB pages). Where transparent huge pages are in `madvise` mode, ask for them on the buffer's
// 2 MiB-aligned interior. Only for buffers far above glibc's mmap threshold (32 MiB), i.e. their own
// mapping; a hint, so failure changes nothing.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = static_cast<uintptr_t>(t.nbytes());
  if (bytes < 32 * kHuge) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace

at::Tensor logprobs_backward_cpu(const c10::optional<at::Tensor>& grad_logprobs,
                                 const c10::optional<at::Tensor>& grad_entropy, const at::Tensor& logits_in,
                                 const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                 double temperature, int64_t ignore_index) {
  check_logprobs_backward_inputs(grad_logprobs, grad_entropy, logits_in, labels, lse, entropy, temperature);
  const at::Tensor logits = last_dim_contiguous(logits_in);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());  // contiguous, like the fake
  advise_huge_pages(grad);
  logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index,
                         grad);
  return grad;
}

void logprobs_backward_inplace_cpu(const c10::optional<at::Tensor>& grad_logprobs,
                                   const c10::optional<at::Tensor>& grad_entropy, at::Tensor& logits,
                                   const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
                                   double temperature, int64_t ignore_index) {
  check_logprobs_backward_inplace_inputs(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature);
  logprobs_backward_into(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index,
                         logits);
}

}  // namespace rlhf_ext
