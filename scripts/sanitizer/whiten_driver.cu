// compute-sanitizer driver for csrc/cuda/whiten.cuh: masked moments (partial + combine) and whitening for
// every dtype, one segment and several (numel over kMomentSegment), masks with holes; checked on the host
// against a two-pass float64 mean / unbiased variance, and 0 outside the mask.
#include "driver.cuh"
#include "whiten.cuh"

using namespace driver;

template <typename T>
void run(Checker& check, int64_t numel, bool shift_mean, unsigned seed) {
  using stat_t = rlhf_ext::acc_t<T>;
  auto x = normal<T>(numel, 3.0, seed);
  auto mask = holey_mask(1, numel, seed + 1);
  const int segments = rlhf_ext::cuda::moments_num_segments(numel);
  double* partials = scratch<double>(3 * segments);
  stat_t* moments = scratch<stat_t>(3);
  stat_t* out = scratch<stat_t>(numel);
  const T* dx = upload(x);
  const bool* dmask = reinterpret_cast<const bool*>(upload(mask));
  CK(rlhf_ext::cuda::launch_masked_moments<T>(dx, dmask, numel, partials, moments, 0));
  CK(rlhf_ext::cuda::launch_masked_whiten<T>(dx, dmask, moments, numel, shift_mean, true, 1e-8, out, 0));
  double n = 0, sum = 0, m2 = 0;
  for (int64_t i = 0; i < numel; ++i) n += mask[i], sum += mask[i] ? to_double(x[i]) : 0.0;
  const double mean = sum / n;
  for (int64_t i = 0; i < numel; ++i) m2 += mask[i] ? (to_double(x[i]) - mean) * (to_double(x[i]) - mean) : 0.0;
  auto got_moments = download(moments, 3);
  auto got = download(out, numel);
  check.close("count", got_moments[0], n, 0);
  check.close("mean", got_moments[1], mean, 1e-5);
  check.close("M2", got_moments[2], m2, 1e-5);
  const double inv_std = 1.0 / std::sqrt(m2 / (n - 1) + 1e-8);
  for (int64_t i = 0; i < numel; ++i) {
    const double want = mask[i] ? (to_double(x[i]) - mean) * inv_std + (shift_mean ? 0.0 : mean) : 0.0;
    check.close("whitened", got[i], want, 1e-4);
  }
}

int main() {
  Checker check{"whiten"};
  run<float>(check, 7, true, 1);
  run<float>(check, 40000, false, 2);  // three segments
  run<double>(check, 333, true, 3);
  run<__half>(check, 515, true, 4);
  run<__nv_bfloat16>(check, 17000, true, 5);
  return check.finish();
}
