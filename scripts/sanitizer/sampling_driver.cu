// compute-sanitizer driver for csrc/cuda/sampling.cuh: launch_sample for fp32 / bf16 / fp16 with greedy,
// temperature, top-k (k >= V too), top-p, min-p, all combined, and per-row settings; V not a multiple of
// the vector width and a padded row stride. Checks: greedy rows give the first argmax, every token is a
// valid index, top-k 1 gives the argmax, and the same seed gives the same tokens twice.
#include "driver.cuh"
#include "sampling.cuh"

using namespace driver;
namespace smp = rlhf_ext::sampling;

template <typename T>
void run(Checker& check, int64_t B, int64_t V, smp::RowSettings settings, const char* what, unsigned seed) {
  const int64_t stride = V + 5;
  auto logits = normal<T>(B * stride, 2.0, seed);
  const T* dlogits = upload(logits);
  int64_t* tokens = scratch<int64_t>(B);
  int64_t* again = scratch<int64_t>(B);
  float *logprobs = scratch<float>(B), *filtered = scratch<float>(B);
  const smp::PhiloxSeed rng{1234u + seed, 8u, nullptr, nullptr, 0};
  CK(smp::launch_sample<T>(dlogits, B, V, stride, settings, rng, tokens, logprobs, filtered, 0));
  CK(smp::launch_sample<T>(dlogits, B, V, stride, settings, rng, again, logprobs, filtered, 0));
  auto got = download(tokens, B), got_again = download(again, B);
  const bool argmax_rows = settings.temperature_value == 0.f || settings.top_k_value == 1;
  for (int64_t b = 0; b < B; ++b) {
    check.close(what, static_cast<double>(got[b] >= 0 && got[b] < V), 1.0, 0);
    check.close("same seed, same token", static_cast<double>(got[b]), static_cast<double>(got_again[b]), 0);
    if (argmax_rows && settings.temperature == nullptr) {
      int64_t best = 0;
      for (int64_t j = 1; j < V; ++j)
        if (to_double(logits[b * stride + j]) > to_double(logits[b * stride + best])) best = j;
      check.close("argmax", static_cast<double>(got[b]), static_cast<double>(best), 0);
    }
  }
}

smp::RowSettings plain(float t, int64_t k, double p, float min_p) {
  return smp::RowSettings{nullptr, nullptr, nullptr, nullptr, t, k, p, min_p};
}

int main() {
  Checker check{"sampling"};
  const int64_t B = 6, V = 3001;
  run<float>(check, B, V, plain(0.f, 0, 1.0, 0.f), "greedy", 1);
  run<float>(check, B, V, plain(0.7f, 0, 1.0, 0.f), "temperature", 2);
  run<float>(check, B, V, plain(1.f, 1, 1.0, 0.f), "top-k 1", 3);
  run<float>(check, B, V, plain(1.f, 50, 1.0, 0.f), "top-k", 4);
  run<float>(check, B, V, plain(1.f, 5000, 1.0, 0.f), "top-k >= V", 5);
  run<float>(check, B, V, plain(1.f, 0, 0.9, 0.f), "top-p", 6);
  run<float>(check, B, V, plain(1.f, 0, 1.0, 0.1f), "min-p", 7);
  run<__nv_bfloat16>(check, B, V, plain(0.9f, 50, 0.9, 0.05f), "combined bf16", 8);
  run<__half>(check, B, 777, plain(1.1f, 20, 0.8, 0.f), "combined fp16", 9);
  const std::vector<float> temps{0.f, 0.5f, 1.f, 1.5f, 0.f, 2.f};
  const std::vector<int64_t> ks{0, 1, 10, 3001, 50, 0};
  const std::vector<double> ps{1.0, 0.5, 0.9, 1.0, 0.95, 0.7};
  const std::vector<float> min_ps{0.f, 0.f, 0.2f, 0.f, 0.f, 0.01f};
  smp::RowSettings per_row{upload(temps), upload(ks), upload(ps), upload(min_ps), 1.f, 0, 1.0, 0.f};
  run<float>(check, B, V, per_row, "per-row settings", 10);
  return check.finish();
}
