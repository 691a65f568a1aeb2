"""csrc/cuda/ppo_loss.cuh on the GPU simulator (tests/sim_harness.py): the forward kernel + combine kernel, the
backward kernel and kl_penalty, against reference.ppo_loss_reference / kl_penalty_reference (autograd for the
gradients) and the CPU kernels (torch.ops.rlhf_ext.ppo_loss / ppo_loss_backward / kl_penalty), for every dtype,
KL estimator and loss aggregation, with holes, empty rows, extreme log-ratios and non-finite padding."""

import pytest
import torch

from rlhf_ext.ops.ppo_loss import _OUT_NAMES, SCALAR_DEFAULTS, STAT_NAMES, op_args
from rlhf_ext.ops.reference import kl_penalty_reference, ppo_loss_reference
from tests.ppo_loss_helpers import make_case

pytestmark = pytest.mark.cuda_sim

SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
KL = {"k1": 1, "k2": 2, "k3": 3}
AGG = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
TOKEN_KEYS = ("logprobs", "old_logprobs", "advantages", "ref_logprobs", "values", "old_values", "returns", "entropy")


def _params(T, has_ref, kw):
    """ppo::Params as the 11 doubles of the harness (what csrc/checks/ppo_loss.cpp fills in)."""
    high = kw["cliprange"] if kw["cliprange_high"] is None else kw["cliprange_high"]
    return torch.tensor(
        [
            1 - kw["cliprange"],
            1 + high,
            kw["dual_clip"] or 0.0,
            -1.0 if kw["cliprange_value"] is None else kw["cliprange_value"],
            kw["vf_coef"],
            kw["kl_coef"],
            kw["entropy_coef"],
            float(T) if kw["loss_agg_norm"] is None else kw["loss_agg_norm"],
            kw["max_log_ratio"],
            float(KL[kw["kl_estimator"]] if has_ref else 0),
            float(AGG[kw["loss_agg"]]),
        ],
        dtype=torch.float64,
    )


def sim_ppo_loss(cuda_sim, case, grad_outs, **kwargs):
    """Forward, then one backward per upstream gradient, on the simulator -> (out [16], [(grad_logprobs,
    grad_values, grad_entropy) per grad_out]). case: [B, T] tensors of one dtype (make_case keys)."""
    kw = {**SCALAR_DEFAULTS, **kwargs}
    lp = case["logprobs"]
    B, T = lp.shape
    dtype = lp.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lib = cuda_sim.library("ppo_loss")
    tokens = [case.get(k) for k in TOKEN_KEYS]
    tokens = [t.contiguous() if t is not None else None for t in tokens]
    mask = case["mask"].contiguous()
    params = _params(T, case.get("ref_logprobs") is not None, kw)
    blocks = lib.call("sim_ppo_forward_blocks", B, check=False)
    workspace = torch.full((blocks, 15), float("nan"), dtype=torch.float64)
    out = torch.full((16,), float("nan"), dtype=acc)
    lib.call(f"sim_ppo_loss_forward_{SUFFIX[dtype]}", *tokens, mask, B, T, params, workspace, out)
    all_grads = []
    for grad_out in grad_outs:
        grads = [
            torch.full((B, T), float("nan"), dtype=dtype) if case.get(k) is not None or k == "logprobs" else None
            for k in ("logprobs", "values", "entropy")
        ]
        lib.call(
            f"sim_ppo_loss_backward_{SUFFIX[dtype]}",
            *tokens,
            mask,
            B,
            T,
            params,
            grad_out.to(acc).contiguous(),
            out.clone(),
            *grads,
        )
        all_grads.append(tuple(grads))
    return out, all_grads


def _check(cuda_sim, case, dtype, **kwargs):
    case = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.items()}
    # The op's raw backward takes a gradient for every output entry (the wrapper detaches all but the loss):
    # one upstream gradient on loss, policy, value, kl and entropy at once (against the CPU kernel), and the
    # loss alone (against the reference's autograd too).
    rich = torch.zeros(16, dtype=torch.float64)
    rich[:5] = torch.tensor([1.0, 0.3, -0.7, 0.2, 0.5])
    loss_only = torch.zeros(16, dtype=torch.float64)
    loss_only[0] = 1.0
    out, (rich_grads, grads) = sim_ppo_loss(cuda_sim, case, [rich, loss_only], **kwargs)
    tight = dtype == torch.float64
    rtol, atol = (1e-10, 1e-12) if tight else (1e-5, 1e-6)

    cpu_out = torch.ops.rlhf_ext.ppo_loss(*op_args(case, **kwargs))
    torch.testing.assert_close(out, cpu_out, rtol=rtol, atol=atol)
    for grad_out, sim_grads in ((rich, rich_grads), (loss_only, grads)):
        cpu_grads = torch.ops.rlhf_ext.ppo_loss_backward(grad_out.to(out.dtype), cpu_out, *op_args(case, **kwargs))
        for name, g, c in zip(("logprobs", "values", "entropy"), sim_grads, cpu_grads):
            if g is not None:
                torch.testing.assert_close(
                    g.double(), c.double(), rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}"
                )

    # The reference in float64 (the oracle): values, statistics, and the gradients by autograd.
    # Masked positions are zeroed for it: the contract says their content does not matter, while autograd
    # through the reference's torch.where would turn inf/NaN there into NaN gradients (0 * NaN).
    clean = {k: torch.where(case["mask"], v.double(), 0.0) if v.is_floating_point() else v for k, v in case.items()}
    leaves = {k: clean[k].requires_grad_() for k in ("logprobs", "values", "entropy") if k in clean}
    ref_in = {k: leaves.get(k, v) for k, v in clean.items()}
    ref = ppo_loss_reference(**ref_in, **kwargs)
    got = dict(zip(_OUT_NAMES, out.double()))
    rtol, atol = (1e-10, 1e-12) if tight else (2e-5, 2e-6)
    for name in ("loss", "policy_loss", "value_loss", "kl", "entropy"):
        torch.testing.assert_close(
            got[name], getattr(ref, name).double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
        )
    for key in STAT_NAMES:
        torch.testing.assert_close(
            got[key], ref.stats[key].double(), rtol=rtol, atol=atol, msg=lambda m: f"stats[{key}]: {m}"
        )
    ref_grads = torch.autograd.grad(ref.loss, list(leaves.values()))
    for (name, leaf_grad), g in zip(zip(leaves, ref_grads), [x for x in grads if x is not None]):
        # bf16/fp16 gradients are stored in the input dtype: one rounding of it
        eps = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0
        torch.testing.assert_close(
            g.double(), leaf_grad, rtol=max(rtol, eps), atol=max(atol, eps * 1e-2), msg=lambda m: f"grad {name}: {m}"
        )
    return out, grads


@pytest.mark.parametrize(
    "dtype, settings",
    [
        (torch.float32, dict(kl_estimator="k3", loss_agg="token-mean", kl_coef=0.1)),
        (torch.float32, dict(kl_estimator="k1", loss_agg="seq-mean-token-mean", dual_clip=3.0, entropy_coef=0.01)),
        (
            torch.float32,
            dict(kl_estimator="k2", loss_agg="seq-mean-token-sum", cliprange_high=0.28, cliprange_value=None),
        ),
        (torch.float32, dict(loss_agg="seq-mean-token-sum-norm", loss_agg_norm=16.0, kl_coef=0.05)),
        (torch.float64, dict(kl_estimator="k3", loss_agg="seq-mean-token-mean", kl_coef=0.1, dual_clip=2.0)),
        (torch.bfloat16, dict(kl_estimator="k3", loss_agg="token-mean", kl_coef=0.1, entropy_coef=0.01)),
        (torch.float16, dict(kl_estimator="k2", loss_agg="seq-mean-token-mean", kl_coef=0.1)),
    ],
    ids=lambda x: str(x) if isinstance(x, torch.dtype) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_forward_backward_match_reference_and_cpu(cuda_sim, dtype, settings):
    """9 x 37 (T is not a multiple of 32), 25% holes, an empty row."""
    _check(cuda_sim, make_case(9, 37, seed=3, empty_rows=(1, 6)), dtype, **settings)


def test_optional_inputs_absent(cuda_sim):
    """No values, no ref_logprobs, no entropy: the kNoKl kernels and NULL gradients."""
    case = make_case(4, 20, seed=5, values=False, ref=False, entropy=False)
    _, grads = _check(cuda_sim, case, torch.float32)
    assert grads[1] is None and grads[2] is None


def test_extreme_log_ratios_and_nonfinite_padding(cuda_sim):
    """Log-prob differences in ±50 (beyond max_log_ratio: clamped, zero gradient), advantages ±100, ±1e4
    values; inf/NaN at masked positions never reach a sum or a gradient."""
    case = make_case(6, 45, seed=8, extreme=True, empty_rows=(2,))
    case["values"] = case["values"] * 1e4
    case["returns"] = case["returns"] * 1e4
    holes = ~case["mask"]
    for key, value in (
        ("logprobs", -float("inf")),
        ("old_logprobs", float("nan")),
        ("advantages", float("inf")),
        ("values", float("nan")),
        ("ref_logprobs", float("nan")),
        ("entropy", float("inf")),
    ):
        case[key] = torch.where(holes, torch.tensor(value), case[key])
    out, grads = _check(cuda_sim, case, torch.float32, kl_coef=0.1, entropy_coef=0.01, max_log_ratio=10.0)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all() and (g[holes] == 0).all()


def test_empty_mask_gives_zeros(cuda_sim):
    case = make_case(3, 10, seed=9, empty_rows=(0, 1, 2))
    out, grads = _check(cuda_sim, case, torch.float32, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    assert (out == 0).all() and all((g == 0).all() for g in grads)


def sim_kl_penalty(cuda_sim, logprobs, ref, estimator, max_log_ratio=20.0):
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    out = torch.full(logprobs.shape, float("nan"), dtype=acc)
    cuda_sim.library("ppo_loss").call(
        f"sim_kl_penalty_{SUFFIX[logprobs.dtype]}",
        logprobs.contiguous(),
        ref.contiguous(),
        logprobs.numel(),
        KL[estimator],
        float(max_log_ratio),
        out,
    )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_kl_penalty_every_estimator(cuda_sim, dtype):
    """Differences from 1e-6 to ±30 (beyond max_log_ratio = 20 for k3), n = 300 over two blocks. The bound is
    what float32 arithmetic guarantees for the estimator's terms (exp(e), e and 1 are each O(1) ulp off), so
    it holds for any correct float32 formula of k3."""
    g = torch.Generator().manual_seed(2)
    ref = -5 * torch.rand(300, generator=g)
    d = torch.cat([torch.logspace(-6, 0, 100), -torch.logspace(-6, 0, 100), 60 * torch.rand(100, generator=g) - 30])
    logprobs, ref = (ref + d).to(dtype), ref.to(dtype)
    for estimator in ("k1", "k2", "k3"):
        out = sim_kl_penalty(cuda_sim, logprobs, ref, estimator)
        cpu = torch.ops.rlhf_ext.kl_penalty(logprobs, ref, estimator, 20.0)
        oracle = kl_penalty_reference(logprobs.double(), ref.double(), estimator)
        assert out.dtype == cpu.dtype
        if dtype == torch.float64:
            torch.testing.assert_close(out, oracle, rtol=1e-12, atol=1e-14)
            continue
        raw = ref.double() - logprobs.double()
        e = raw.clamp(-20, 20)
        scale = {"k1": raw.abs(), "k2": raw * raw, "k3": e.exp() + e.abs() + 1}[estimator]
        bound = 4 * torch.finfo(torch.float32).eps * (scale + oracle.abs())
        # The simulator's expf is ~|x| ulp off (11 ulp measured at x = 16; a GPU's is <= 2 ulp), so its k3 bound
        # grows with |e|.
        sim_bound = bound * (1 + e.abs()) if estimator == "k3" else bound
        for name, value, limit in (("simulator", out, sim_bound), ("cpu", cpu, bound)):
            err = (value.double() - oracle).abs()
            assert (err <= limit).all(), f"{estimator} {name}: max error / bound {(err / limit).max().item():.2f}"
