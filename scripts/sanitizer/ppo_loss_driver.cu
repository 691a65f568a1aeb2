// compute-sanitizer driver for csrc/cuda/ppo_loss.cuh: forward (+ combine) and backward for every KL
// estimator, with and without values / entropy, every dtype, more rows than one block handles at once,
// masks with holes and an empty row; kl_penalty for k1/k2/k3. Checked on the host with the same per-token
// maths (csrc/maths/ppo_loss.h): the token count, the k3 KL per token, and the token-mean policy loss.
#include <string>

#include "driver.cuh"
#include "ppo_loss.cuh"

using namespace driver;
namespace pc = rlhf_ext::ppo_cuda;
namespace ppo = rlhf_ext::ppo;

template <typename T>
void run(Checker& check, int64_t B, int64_t L, int kl, bool full, unsigned seed) {
  using acc_t = rlhf_ext::acc_t<T>;
  const int64_t n = B * L;
  auto old = normal<T>(n, 1.0, seed), adv = normal<T>(n, 1.0, seed + 1), ref = normal<T>(n, 1.0, seed + 2);
  std::vector<T> logprobs(n);
  auto noise = normal<double>(n, 0.2, seed + 3);
  for (int64_t i = 0; i < n; ++i) logprobs[i] = from_double<T>(to_double(old[i]) + noise[i]);
  auto values = normal<T>(n, 1.0, seed + 4), entropy = normal<T>(n, 1.0, seed + 5);
  auto mask = holey_mask(B, L, seed + 6);
  pc::TokenArgs<T> x{upload(logprobs), upload(old), upload(adv), kl ? upload(ref) : nullptr,
                     full ? upload(values) : nullptr, full ? upload(old) : nullptr, full ? upload(adv) : nullptr,
                     full ? upload(entropy) : nullptr, reinterpret_cast<const bool*>(upload(mask)), B, L};
  ppo::Params p;
  p.kl_estimator = kl;
  p.kl_coef = kl ? 0.1 : 0.0;
  p.entropy_coef = full ? 0.01 : 0.0;
  double* workspace = scratch<double>(pc::forward_blocks(B) * ppo::kNumPart);
  acc_t* out = scratch<acc_t>(ppo::kNumOut);
  CK(pc::launch_ppo_loss_forward<T>(x, p, workspace, out, 0));
  std::vector<acc_t> ones(ppo::kNumOut, acc_t(0));
  ones[ppo::kLoss] = acc_t(1);
  T *grad_lp = scratch<T>(n), *grad_v = full ? scratch<T>(n) : nullptr, *grad_e = full ? scratch<T>(n) : nullptr;
  CK(pc::launch_ppo_loss_backward<T>(x, p, upload(ones), out, grad_lp, grad_v, grad_e, 0));
  auto got = download(out, ppo::kNumOut);
  double tokens = 0, policy = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!mask[i]) continue;
    tokens += 1;
    policy += ppo::policy_token<double>(to_double(logprobs[i]), to_double(old[i]), to_double(adv[i]), 20.0, 0.8,
                                        1.2, 0.0).loss;
  }
  check.close("num_tokens", got[ppo::kNumTokens], tokens, 0);
  check.close("policy_loss", got[ppo::kPolicyLoss], policy / tokens, sizeof(T) == 8 ? 1e-10 : 1e-2);
  auto grads = download(grad_lp, n);
  for (int64_t i = 0; i < n; ++i)
    if (!mask[i]) check.close("grad outside the mask", to_double(grads[i]), 0.0, 0);
  if (kl) {
    acc_t* per_token = scratch<acc_t>(n);
    CK(pc::launch_kl_penalty<T>(x.logprobs, x.ref_logprobs, n, kl, acc_t(20), per_token, 0));
    auto got_kl = download(per_token, n);
    for (int64_t i = 0; i < n; ++i) {
      const double want = kl == ppo::kK3
          ? ppo::kl_token<ppo::kK3, double>(to_double(logprobs[i]), to_double(ref[i]), 20.0).kl
          : (kl == ppo::kK1 ? to_double(logprobs[i]) - to_double(ref[i])
                            : 0.5 * std::pow(to_double(logprobs[i]) - to_double(ref[i]), 2));
      check.close("kl_penalty", got_kl[i], want, sizeof(T) == 8 ? 1e-12 : 1e-5);
    }
  }
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";  // the simulator: skip the 1030-row case
  Checker check{"ppo_loss"};
  run<float>(check, 5, 300, ppo::kK3, true, 1);
  run<float>(check, 3, 41, ppo::kNoKl, false, 2);
  run<float>(check, 3, 41, ppo::kK1, true, 3);
  run<double>(check, 4, 77, ppo::kK2, true, 4);
  run<__nv_bfloat16>(check, 3, 129, ppo::kK3, false, 5);
  run<__half>(check, 2, 65, ppo::kK3, true, 6);
  if (!quick) run<float>(check, 1030, 9, ppo::kK3, false, 7);  // more rows than the forward grid (grid-stride)
  return check.finish();
}
