"""ppo_loss / kl_penalty as ops: kl_penalty numerics, opcheck, torch.compile, bad inputs, CUDA."""

import pytest
import torch

import rlhf_ext  # noqa: F401
from rlhf_ext.ops import kl_penalty, ppo_loss
from rlhf_ext.ops.ppo_loss import SCALAR_DEFAULTS, STAT_NAMES, TENSOR_ARGS, op_args
from rlhf_ext.ops.reference import kl_penalty_reference, ppo_loss_reference
from tests.ppo_loss_helpers import (
    LOSS_AGGS,
    assert_grads_close,
    assert_outputs_close,
    make_case,
    run,
)


def test_op_args_follow_the_schema():
    # op_args builds the raw op's positional arguments from these names: they must be the schema's, in its order.
    schema = [a.name for a in torch.ops.rlhf_ext.ppo_loss.default._schema.arguments]
    assert [*TENSOR_ARGS, *SCALAR_DEFAULTS] == schema
    with pytest.raises(TypeError, match=r"scalars: expected names among cliprange, .*got clip_range"):
        op_args({}, clip_range=0.1)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kl_penalty_matches_reference(estimator, dtype):
    g = torch.Generator().manual_seed(0)
    logprobs = (-5 * torch.rand(7, 45, generator=g)).to(dtype)
    ref = logprobs.float() + torch.cat([torch.randn(7, 40, generator=g), 60 * torch.randn(7, 5, generator=g)], 1)
    ref = ref.to(dtype)  # some differences far beyond the ±20 clamp
    lp_leaf, ref_leaf = logprobs.clone().requires_grad_(), ref.clone().requires_grad_()
    out = kl_penalty(lp_leaf, ref_leaf, estimator)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all()
    lp64, ref64 = logprobs.double().requires_grad_(), ref.double().requires_grad_()
    expect = kl_penalty_reference(lp64, ref64, estimator)
    torch.testing.assert_close(out.double(), expect, rtol=2e-6, atol=1e-6)
    weights = torch.rand(7, 45, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), [lp_leaf, ref_leaf])
    expect_grads = torch.autograd.grad((expect * weights).sum(), [lp64, ref64])
    tol = torch.finfo(dtype).eps if dtype != torch.float32 else 2e-6
    for a, b in zip(grads, expect_grads):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=1e-6)


def _k3_float64(e):
    """exp(e) - 1 - e in float64 from its series (exact to rounding for |e| <= 1e-3; no cancellation)."""
    return e * e * (1 / 2 + e * (1 / 6 + e * (1 / 24 + e * (1 / 120 + e / 720))))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k3_small_differences_keep_float32_precision(sign):
    # (exp(e) - e) - 1 and even expm1(e) - e in float32 lose most digits for small |e| (2 / |e| cancellation).
    e = sign * torch.tensor([1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6], dtype=torch.float32)
    logprobs = torch.zeros_like(e)  # ref - logprobs == e exactly in float32
    want = _k3_float64(e.double())
    grad_want = -torch.expm1(e.double())  # d k3 / d logprobs
    lp = logprobs.clone().requires_grad_()
    got = kl_penalty(lp, e, "k3")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    got.sum().backward()
    torch.testing.assert_close(lp.grad.double(), grad_want, rtol=1e-6, atol=0)
    ref_lp = logprobs.clone().requires_grad_()
    ref = kl_penalty_reference(ref_lp, e, "k3")
    torch.testing.assert_close(ref.double(), want, rtol=1e-6, atol=0)
    ref.sum().backward()
    torch.testing.assert_close(ref_lp.grad.double(), grad_want, rtol=1e-6, atol=0)
    # The same estimator inside the fused loss (KL term) and its approxkl_k3 statistic (of the old/new ratio).
    mask = torch.ones_like(e, dtype=torch.bool)[None]
    out = ppo_loss(
        logprobs[None], -e[None], torch.zeros_like(e)[None], mask, ref_logprobs=e[None], kl_estimator="k3", kl_coef=1.0
    )
    torch.testing.assert_close(out.kl.double(), want.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.stats["approxkl_k3"].double(), want.mean(), rtol=1e-6, atol=0)
    expect = ppo_loss_reference(
        logprobs[None], -e[None], torch.zeros_like(e)[None], mask, ref_logprobs=e[None], kl_estimator="k3", kl_coef=1.0
    )
    torch.testing.assert_close(expect.kl.double(), want.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(expect.stats["approxkl_k3"].double(), want.mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("e", [-20.0, -3.0, -1.0, -0.7, -0.2, 0.2, 0.7, 1.0, 3.0, 20.0])
def test_k3_matches_float64_across_the_range(e):
    # Both sides of the small-|e| switch, float32 and float64 inputs.
    for dtype, rtol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        ref = torch.tensor([e], dtype=dtype)
        lp = torch.zeros(1, dtype=dtype, requires_grad=True)
        got = kl_penalty(lp, ref, "k3")
        e64 = torch.tensor([e], dtype=torch.float64)
        torch.testing.assert_close(got.double(), torch.expm1(e64) - e64, rtol=rtol, atol=0)
        got.sum().backward()
        torch.testing.assert_close(lp.grad.double(), -torch.expm1(e64), rtol=rtol, atol=0)


def test_kl_penalty_equals_the_loss_kl_term():
    case = make_case(4, 30, seed=4, empty_rows=())
    case["mask"].fill_(True)
    policy_and_kl = {k: case[k] for k in ("logprobs", "old_logprobs", "advantages", "mask", "ref_logprobs")}
    for estimator in ("k1", "k2", "k3"):
        out = ppo_loss(**policy_and_kl, kl_estimator=estimator)
        per_token = kl_penalty(case["logprobs"], case["ref_logprobs"], estimator)
        torch.testing.assert_close(out.kl, per_token.mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["all-terms", "policy-only", "seq-mean-dual"])
def test_opcheck(variant):
    case = make_case(
        3, 8, seed=6, values=variant != "policy-only", ref=variant != "policy-only", entropy=variant == "all-terms"
    )
    for k in ("logprobs", "values", "entropy"):
        if k in case:
            case[k].requires_grad_()
    overrides = {
        "all-terms": dict(kl_coef=0.1, entropy_coef=0.01, kl_estimator="k2"),
        "policy-only": dict(cliprange_value=None),
        "seq-mean-dual": dict(dual_clip=3.0, loss_agg="seq-mean-token-sum-norm", loss_agg_norm=5.0),
    }[variant]
    torch.library.opcheck(torch.ops.rlhf_ext.ppo_loss.default, op_args(case, **overrides))


def test_opcheck_backward_and_kl_penalty():
    case = make_case(3, 8, seed=6)
    args = op_args(case, kl_coef=0.1)
    out = torch.ops.rlhf_ext.ppo_loss(*args)
    torch.library.opcheck(torch.ops.rlhf_ext.ppo_loss_backward.default, (torch.rand(16), out) + args)
    lp = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.rlhf_ext.kl_penalty.default, (lp, torch.randn(4, 6), "k3", 20.0))


def test_torch_compile_fullgraph():
    case = make_case(4, 16, seed=10)
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean")

    def step(logprobs, values, entropy):
        out = ppo_loss(**dict(case, logprobs=logprobs, values=values, entropy=entropy), **kwargs)
        return out.loss, out.stats["clipfrac"], kl_penalty(logprobs, case["ref_logprobs"], "k3")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [case[k].clone().requires_grad_() for k in ("logprobs", "values", "entropy")]
    loss, clipfrac, per_token = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [case[k].clone().requires_grad_() for k in ("logprobs", "values", "entropy")]
    e_loss, e_clipfrac, e_per_token = step(*eager_leaves)
    e_grads = torch.autograd.grad(e_loss, eager_leaves)
    torch.testing.assert_close(loss, e_loss)
    torch.testing.assert_close(clipfrac, e_clipfrac)
    torch.testing.assert_close(per_token, e_per_token)
    for a, b in zip(grads, e_grads):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    case = make_case(3, 8, seed=0)
    lp, old, adv, mask = (case[k] for k in ("logprobs", "old_logprobs", "advantages", "mask"))
    with pytest.raises(RuntimeError, match=r"advantages: expected shape \[3, 8\].*got \[3, 7\]"):
        ppo_loss(lp, old, adv[:, :7], mask)
    with pytest.raises(RuntimeError, match=r"mask: expected shape \[3, 8\]"):
        ppo_loss(lp, old, adv, mask[:2])
    with pytest.raises(RuntimeError, match=r"logprobs: expected a 2-d tensor"):
        ppo_loss(lp[0], old[0], adv[0], mask[0])
    with pytest.raises(RuntimeError, match=r"entropy: expected shape"):
        ppo_loss(lp, old, adv, mask, entropy=case["entropy"].T)
    with pytest.raises(ValueError, match=r"values: given without old_values"):
        ppo_loss(lp, old, adv, mask, values=case["values"], returns=case["returns"])
    with pytest.raises(ValueError, match=r"values: given without returns"):
        ppo_loss(lp, old, adv, mask, values=case["values"], old_values=case["old_values"])
    with pytest.raises(ValueError, match=r"returns: given without values"):
        ppo_loss(lp, old, adv, mask, returns=case["returns"])
    for bad in (1.0, 0.5, -2.0):
        with pytest.raises(ValueError, match=r"dual_clip: expected a value > 1"):
            ppo_loss(lp, old, adv, mask, dual_clip=bad)
    with pytest.raises(ValueError, match=r"kl_estimator: expected one of 'k1', 'k2', 'k3', got 'k4'"):
        ppo_loss(lp, old, adv, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match=r"loss_agg: expected one of .*got 'mean'"):
        ppo_loss(lp, old, adv, mask, loss_agg="mean")
    with pytest.raises(ValueError, match=r"loss_agg_norm: only used with"):
        ppo_loss(lp, old, adv, mask, loss_agg_norm=4.0)
    with pytest.raises(ValueError, match=r"kl_coef: is 0.1 but ref_logprobs is None"):
        ppo_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"entropy_coef: is 0.1 but entropy is None"):
        ppo_loss(lp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match=r"estimator: expected one of"):
        kl_penalty(lp, case["ref_logprobs"], "low_var_kl")
    with pytest.raises(RuntimeError, match=r"ref_logprobs: expected shape"):
        kl_penalty(lp, case["ref_logprobs"][:, :3])
    # The op checks the same things itself (direct torch.ops callers get them too).
    with pytest.raises(RuntimeError, match=r"dual_clip: expected a finite value > 1"):
        torch.ops.rlhf_ext.ppo_loss(*op_args(case, dual_clip=0.9))
    with pytest.raises(RuntimeError, match=r"mask: expected a bool tensor, got Float"):
        torch.ops.rlhf_ext.ppo_loss(*op_args(dict(case, mask=case["mask"].float())))
    with pytest.raises(RuntimeError, match=r"max_log_ratio: expected a value in \(0, 80\]"):
        torch.ops.rlhf_ext.ppo_loss(*op_args(case, max_log_ratio=100.0))
    with pytest.raises(RuntimeError, match=r"cliprange: expected a value in \[0, 1\)"):
        torch.ops.rlhf_ext.ppo_loss(*op_args(case, cliprange=1.5))
    with pytest.raises(RuntimeError, match=r"loss_agg: expected one of"):
        torch.ops.rlhf_ext.ppo_loss(*op_args(case, loss_agg="sum"))
    with pytest.raises(RuntimeError, match=r"old_logprobs: expected a float32/bfloat16/float16/float64 tensor"):
        torch.ops.rlhf_ext.ppo_loss(*op_args(dict(case, old_logprobs=case["old_logprobs"].long())))


def test_per_sequence_advantages_broadcast():
    case = make_case(4, 10, seed=16)
    per_seq = torch.randn(4)
    expanded = dict(case, advantages=per_seq[:, None].expand(4, 10).contiguous())
    want, want_grads = run(ppo_loss, expanded, kl_coef=0.1)
    for shape in ((4,), (4, 1)):
        got, got_grads = run(ppo_loss, dict(case, advantages=per_seq.reshape(shape)), kl_coef=0.1)
        assert torch.equal(got.loss, want.loss)
        assert all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads)


def test_unclipped_value_loss():
    case = make_case(3, 12, seed=13)
    out, grads = run(ppo_loss, case, cliprange_value=None, vf_coef=1.0)
    ref, ref_grads = run(ppo_loss_reference, case, dtype=torch.float64, cliprange_value=None, vf_coef=1.0)
    assert_outputs_close(out, ref)
    assert_grads_close(grads, ref_grads)
    assert out.stats["value_clipfrac"].item() == 0


# ---- CUDA: the same kernels' maths (csrc/maths/ppo_loss.h) on the GPU, checked against the CPU ----


@pytest.mark.cuda
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(loss_agg, dtype):
    case = make_case(37, 1000, seed=14)
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, loss_agg=loss_agg, cliprange_high=0.28)
    gpu_case = {k: v.cuda() for k, v in case.items()}
    out, grads = run(ppo_loss, gpu_case, dtype=dtype, **kwargs)
    ref, ref_grads = run(
        ppo_loss_reference,
        {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.items()},
        dtype=torch.float64,
        **kwargs,
    )
    assert out.loss.device.type == "cuda" and all(v.device.type == "cuda" for v in out.stats.values())
    # __expf (fast math) is a few ulp off expf; the sums run in a different order than on the CPU.
    assert_outputs_close(out, ref, rtol=2e-5, atol=1e-5)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 2e-5
    assert_grads_close({k: v.cpu() for k, v in grads.items()}, ref_grads, rtol=eps, atol=1e-7)
    for estimator in ("k1", "k2", "k3"):
        torch.testing.assert_close(
            kl_penalty(gpu_case["logprobs"], gpu_case["ref_logprobs"], estimator).cpu(),
            kl_penalty(case["logprobs"], case["ref_logprobs"], estimator),
            rtol=2e-5,
            atol=1e-5,
        )


@pytest.mark.cuda
def test_cuda_is_deterministic_and_handles_empty_masks():
    case = {k: v.cuda() for k, v in make_case(300, 257, seed=15).items()}
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    first, first_grads = run(ppo_loss, case, **kwargs)
    second, second_grads = run(ppo_loss, case, **kwargs)
    assert torch.equal(first.loss, second.loss)
    assert all(torch.equal(first.stats[k], second.stats[k]) for k in STAT_NAMES)
    assert all(torch.equal(first_grads[k], second_grads[k]) for k in first_grads)
    case["mask"].zero_()
    empty, empty_grads = run(ppo_loss, case, **kwargs)
    assert empty.loss.item() == 0 and all(torch.count_nonzero(g) == 0 for g in empty_grads.values())
