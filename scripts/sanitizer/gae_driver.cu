// compute-sanitizer driver for csrc/cuda/gae.cuh: launch_gae for every dtype, T over one scan chunk,
// masks with holes and an empty row, with and without last_values; float rows checked against the
// reverse recursion of rlhf_ext/ops/reference.py:gae_reference on the host.
#include "driver.cuh"
#include "gae.cuh"

using namespace driver;

template <typename T>
void run(Checker& check, int64_t B, int64_t L, bool with_last, unsigned seed) {
  using acc_t = rlhf_ext::acc_t<T>;
  const double gamma = 0.99, lam = 0.95;
  auto rewards = normal<T>(B * L, 1.0, seed), values = normal<T>(B * L, 1.0, seed + 1);
  auto last = normal<acc_t>(B, 1.0, seed + 2);
  auto mask = holey_mask(B, L, seed + 3);
  acc_t* adv = scratch<acc_t>(B * L);
  acc_t* ret = scratch<acc_t>(B * L);
  CK(rlhf_ext::cuda::launch_gae<T>(upload(rewards), upload(values), reinterpret_cast<const bool*>(upload(mask)),
                                   with_last ? upload(last) : nullptr, adv, ret, B, L, gamma, lam, 0));
  auto got_adv = download(adv, B * L), got_ret = download(ret, B * L);
  const double tol = sizeof(T) == 8 ? 1e-10 : 1e-4;
  for (int64_t b = 0; b < B; ++b) {
    double next_value = with_last ? static_cast<double>(last[b]) : 0.0, running = 0.0;
    for (int64_t t = L - 1; t >= 0; --t) {
      const int64_t i = b * L + t;
      double want_adv = 0.0, want_ret = 0.0;
      if (mask[i]) {
        const double v = to_double(values[i]);
        running = to_double(rewards[i]) + gamma * next_value - v + gamma * lam * running;
        next_value = v;
        want_adv = running;
        want_ret = running + v;
      }
      check.close("advantages", got_adv[i], want_adv, tol);
      check.close("returns", got_ret[i], want_ret, tol);
    }
  }
}

int main() {
  Checker check{"gae"};
  run<float>(check, 3, 37, true, 1);
  run<float>(check, 2, 1500, false, 2);  // more than one 1024-step chunk
  run<double>(check, 3, 37, true, 3);
  run<__half>(check, 2, 41, true, 4);
  run<__nv_bfloat16>(check, 2, 41, false, 5);
  return check.finish();
}
