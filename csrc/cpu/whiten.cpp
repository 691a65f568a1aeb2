// Masked mean / variance / whitening on CPU.
//
// masked_moments returns (count, mean, M2) in one pass over memory: the flattened input is cut into
// fixed blocks (independent of the thread count, so results are bit-identical for any number of
// threads); each block's deviations from its first selected value are summed, then its squared deviations
// from its mean while it is still in cache, and the blocks are merged in index order with Chan's parallel
// formula.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <vector>

#include "../checks/checks.h"
#include "../kernels.h"

namespace rlhf_ext {

namespace {

constexpr int64_t kBlock = 8192;
// Elements per parallel task (~1 ns each in the two-pass moments, less in the write): ~50 us of work, so the
// [B, T] of one RL batch runs on the calling thread instead of paying a pool wake-up (13-16 ms measured on a
// busy 2-core machine).
constexpr int64_t kElementsPerTask = 65536;

struct Moments {
  double count = 0, mean = 0, m2 = 0;
};

void merge(Moments& into, const Moments& other) {
  if (other.count == 0) return;
  if (into.count == 0) {
    into = other;
    return;
  }
  const double n = into.count + other.count;
  const double delta = other.mean - into.mean;
  into.mean += delta * other.count / n;
  into.m2 += other.m2 + delta * delta * into.count * other.count / n;
  into.count = n;
}

// Loads up to kTile elements of x and mask as float32 (masked-out x become `fill`), so the reductions
// below run on plain float arrays with at::vec::Vectorized whatever the input dtype.
constexpr int64_t kTile = 256;

template <typename scalar_t>
inline void load_tile(const scalar_t* x, const bool* m, int64_t n, float fill, float* xs, float* ms) {
  for (int64_t i = 0; i < n; ++i) {
    ms[i] = m[i] ? 1.f : 0.f;
    xs[i] = m[i] ? static_cast<float>(x[i]) : fill;
  }
}

// Finds the block's first selected value (false when the mask selects nothing). Sums are taken of
// deviations from it: a constant block then has exactly zero deviations, so its mean is exact and its M2
// is 0 however large the values (a mean rounded while summing 1e30s leaves deviations of ~1e23 whose
// squares overflow float32).
template <typename scalar_t>
inline bool first_selected(const scalar_t* x, const bool* m, int64_t n, scalar_t& pivot) {
  for (int64_t i = 0; i < n; ++i) {
    if (m[i]) {
      pivot = x[i];
      return true;
    }
  }
  return false;
}

template <typename scalar_t, typename acc_t>
Moments block_moments(const scalar_t* x, const bool* m, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t W = Vec::size();
  alignas(64) float xs[kTile];
  alignas(64) float ms[kTile];
  scalar_t first{};
  if (!first_selected(x, m, n, first)) return Moments{};
  const float pivot = static_cast<float>(first);
  const Vec vpivot(pivot);
  // Pass 1 over the block (it stays in cache): masked sum of deviations from the pivot (masked-out
  // positions hold the pivot itself, so they add exactly 0) and the count.
  acc_t sum = 0, count = 0;
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    load_tile(x + start, m + start, len, pivot, xs, ms);
    Vec vsum(0.f), vcount(0.f);
    int64_t i = 0;
    for (; i + W <= len; i += W) {
      vsum += Vec::loadu(xs + i) - vpivot;
      vcount += Vec::loadu(ms + i);
    }
    float tile_sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
    float tile_count = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vcount);
    for (; i < len; ++i) {
      tile_sum += xs[i] - pivot;
      tile_count += ms[i];
    }
    sum += tile_sum;
    count += tile_count;
  }
  Moments out;
  const acc_t mean = static_cast<acc_t>(pivot) + sum / count;
  // Pass 2 over the same block: squared deviations from the block mean (masked-out terms are 0).
  acc_t m2 = 0;
  const Vec vmean(static_cast<float>(mean));
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    load_tile(x + start, m + start, len, static_cast<float>(mean), xs, ms);
    Vec vm2(0.f);
    int64_t i = 0;
    for (; i + W <= len; i += W) {
      const Vec d = Vec::loadu(xs + i) - vmean;
      vm2 += d * d;
    }
    float tile_m2 = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vm2);
    for (; i < len; ++i) {
      const float d = xs[i] - static_cast<float>(mean);
      tile_m2 += d * d;
    }
    m2 += tile_m2;
  }
  out.count = static_cast<double>(count);
  out.mean = static_cast<double>(mean);
  out.m2 = static_cast<double>(m2);
  return out;
}

// float64 inputs keep a float64 scalar path (they are the test oracle's precision, not a speed path).
template <>
Moments block_moments<double, double>(const double* x, const bool* m, int64_t n) {
  double pivot = 0;
  if (!first_selected(x, m, n, pivot)) return Moments{};
  double sum = 0, count = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum += m[i] ? x[i] - pivot : 0.0;
    count += m[i] ? 1.0 : 0.0;
  }
  Moments out;
  const double mean = pivot + sum / count;
  double m2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = m[i] ? x[i] - mean : 0.0;
    m2 += d * d;
  }
  out.count = count;
  out.mean = mean;
  out.m2 = m2;
  return out;
}

Moments moments_of(const at::Tensor& x, const at::Tensor& mask) {
  const int64_t numel = x.numel();
  const int64_t num_blocks = (numel + kBlock - 1) / kBlock;
  std::vector<Moments> blocks(num_blocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_moments_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool* mp = mask.data_ptr<bool>();
    at::parallel_for(0, num_blocks, kElementsPerTask / kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t start = blk * kBlock;
        blocks[blk] = block_moments<scalar_t, acc_t>(xp + start, mp + start, std::min(kBlock, numel - start));
      }
    });
  });
  Moments total;
  for (const auto& b : blocks) merge(total, b);
  return total;
}

}  // namespace

at::Tensor masked_moments_cpu(const at::Tensor& x_in, const at::Tensor& mask_in) {
  check_masked_inputs(x_in, mask_in);
  auto x = x_in.contiguous();
  auto mask = mask_in.contiguous();
  const Moments mo = moments_of(x, mask);
  auto out = at::empty({3}, x.options().dtype(at::kDouble));
  auto* o = out.data_ptr<double>();
  o[0] = mo.count;
  o[1] = mo.mean;
  o[2] = mo.m2;
  return out.to(acc_dtype(x.scalar_type()));
}

at::Tensor masked_whiten_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean,
                             bool unbiased, double eps) {
  check_masked_whiten_inputs(x_in, mask_in, eps);
  auto x = x_in.contiguous();
  auto mask = mask_in.contiguous();
  const Moments mo = moments_of(x, mask);
  check_whiten_count(mo.count, unbiased);
  const double var = mo.m2 / (unbiased ? mo.count - 1 : mo.count);
  auto out = at::empty(x.sizes(), x.options().dtype(acc_dtype(x.scalar_type())));
  const int64_t numel = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_whiten_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const bool* mp = mask.data_ptr<bool>();
    const acc_t mean = static_cast<acc_t>(mo.mean);
    const acc_t inv_std = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    const acc_t add_back = shift_mean ? acc_t(0) : mean;
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_whiten_cpu_out", [&] {
      using out_t = scalar_t;
      out_t* op = out.data_ptr<out_t>();
      at::parallel_for(0, numel, kElementsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          // Selected, not multiplied by a 0/1 mask: 0 * inf is NaN, and the contract is 0 outside the mask.
          op[i] = mp[i] ? static_cast<out_t>((static_cast<acc_t>(xp[i]) - mean) * inv_std + add_back) : out_t(0);
        }
      });
    });
  });
  return out;
}

}  // namespace rlhf_ext
