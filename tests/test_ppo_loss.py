"""Fused PPO/GRPO loss numerics against the plain-PyTorch twin (rlhf_ext/ops/reference.py).

The oracle is the reference evaluated in float64 on the same input values, so the tolerances below
only have to cover the kernel's float32 arithmetic (bf16/fp16 gradients: one rounding to that dtype).
"""

import os
import subprocess
import sys
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_ext  # noqa: F401
from rlhf_ext.ops import ppo_loss
from rlhf_ext.ops.ppo_loss import STAT_NAMES
from rlhf_ext.ops.reference import ppo_loss_reference
from tests.ppo_loss_helpers import (
    GRAD_LEAVES,
    LOSS_AGGS,
    assert_grads_close,
    assert_outputs_close,
    call,
    make_case,
    run,
)

CLIP_MODES = {
    "plain": {},
    "clip-higher": {"cliprange": 0.2, "cliprange_high": 0.28},
    "dual-clip": {"dual_clip": 2.0},
}


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_estimator", [None, "k1", "k2", "k3"])
@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
@pytest.mark.parametrize("with_values,with_entropy", [(True, True), (False, False), (True, False), (False, True)])
def test_matches_reference_grid(loss_agg, kl_estimator, clip_mode, with_values, with_entropy):
    seed = zlib.crc32(repr((loss_agg, kl_estimator, clip_mode, with_values, with_entropy)).encode()) % 10_000
    case = make_case(
        6,
        37,
        seed=seed,
        values=with_values,
        ref=kl_estimator is not None,
        entropy=with_entropy,
        spread=0.8 if clip_mode == "dual-clip" else 0.5,
    )
    kwargs = dict(CLIP_MODES[clip_mode], loss_agg=loss_agg, vf_coef=0.3)
    if kl_estimator is not None:
        kwargs.update(kl_coef=0.07, kl_estimator=kl_estimator)
    if with_entropy:
        kwargs["entropy_coef"] = 0.01
    if loss_agg == "seq-mean-token-sum-norm" and seed % 2:
        kwargs["loss_agg_norm"] = 11.0
    out, grads = run(ppo_loss, case, **kwargs)
    ref, ref_grads = run(ppo_loss_reference, case, dtype=torch.float64, **kwargs)
    assert_outputs_close(out, ref)
    assert_grads_close(grads, ref_grads)
    assert out.stats["clipfrac"] > 0  # the data do exercise the clipped branch
    if clip_mode == "dual-clip":
        assert out.stats["dual_clipfrac"] > 0


# Derandomized (the same 40 examples every run) so CI cannot flake; PPO_HYPOTHESIS_RANDOM=1 and
# PPO_HYPOTHESIS_EXAMPLES=500 explore further by hand.
@settings(
    max_examples=int(os.environ.get("PPO_HYPOTHESIS_EXAMPLES", 40)),
    deadline=None,
    derandomize=os.environ.get("PPO_HYPOTHESIS_RANDOM") != "1",
)
@given(
    B=st.integers(1, 9),
    T=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    loss_agg=st.sampled_from(LOSS_AGGS),
    kl=st.sampled_from([None, "k1", "k2", "k3"]),
    values=st.booleans(),
    entropy=st.booleans(),
    dual_clip=st.sampled_from([None, 1.5, 3.0]),
    cliprange_high=st.sampled_from([None, 0.28]),
    holes=st.sampled_from([0.0, 0.3, 0.9]),
    spread=st.sampled_from([0.05, 0.5, 3.0]),
)
def test_matches_reference_random(B, T, seed, loss_agg, kl, values, entropy, dual_clip, cliprange_high, holes, spread):
    case = make_case(
        B,
        T,
        seed=seed,
        values=values,
        ref=kl is not None,
        entropy=entropy,
        holes=holes,
        spread=spread,
        empty_rows=(seed % (B + 1),),
    )
    kwargs = dict(
        loss_agg=loss_agg, dual_clip=dual_clip, cliprange_high=cliprange_high, entropy_coef=0.01 if entropy else 0.0
    )
    if kl is not None:
        kwargs.update(kl_coef=0.1, kl_estimator=kl)
    out, grads = run(ppo_loss, case, **kwargs)
    ref, ref_grads = run(ppo_loss_reference, case, dtype=torch.float64, **kwargs)
    scale = max(1.0, ref.loss.abs().item())  # spread 3 reaches ratios of e^9 or more
    assert_outputs_close(out, ref, rtol=1e-5, atol=1e-6 * scale)
    assert_grads_close(grads, ref_grads, rtol=1e-5, atol=1e-7 * scale)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_extreme_log_ratios_stay_finite(kl_estimator, loss_agg):
    case = make_case(5, 64, seed=7, extreme=True)
    kwargs = dict(kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01, loss_agg=loss_agg, dual_clip=2.0)
    out, grads = run(ppo_loss, case, **kwargs)
    ref, ref_grads = run(ppo_loss_reference, case, dtype=torch.float64, **kwargs)
    for t in [out.loss, out.policy_loss, out.kl, *out.stats.values(), *grads.values()]:
        assert torch.isfinite(t).all()
    assert out.stats["ratio_max"] == pytest.approx(torch.exp(torch.tensor(20.0)).item(), rel=1e-5)  # the clamp
    # Terms reach exp(20) * 100 per token here, so absolute slack scales with them.
    assert_outputs_close(out, ref, rtol=2e-5, atol=1e-5 * max(1.0, ref.loss.abs().item()))
    assert_grads_close(grads, ref_grads, rtol=2e-5, atol=1e-6 * max(g.abs().max().item() for g in ref_grads.values()))


def test_garbage_under_the_mask_is_ignored():
    case = make_case(4, 50, seed=3)
    dirty = {k: v.clone() for k, v in case.items()}
    for v in dirty.values():
        if v.is_floating_point():
            v[~case["mask"]] = float("nan")
            v[~case["mask"] & (torch.arange(50) % 2 == 0)] = float("inf")
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    clean, clean_grads = run(ppo_loss, case, **kwargs)
    out, grads = run(ppo_loss, dirty, **kwargs)
    assert_outputs_close(out, clean, rtol=0, atol=0)
    for name in grads:
        assert torch.equal(grads[name], clean_grads[name])


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_empty_mask_gives_zeros(loss_agg):
    case = make_case(3, 9, seed=1)
    case["mask"].zero_()
    out, grads = run(ppo_loss, case, kl_coef=0.1, entropy_coef=0.1, loss_agg=loss_agg)
    assert out.loss.item() == 0
    for v in [out.policy_loss, out.value_loss, out.kl, out.entropy, *out.stats.values()]:
        assert v.item() == 0
    for g in grads.values():
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("loss_agg", LOSS_AGGS[1:])
def test_fully_masked_rows_are_left_out_of_the_seq_mean(loss_agg):
    case = make_case(5, 20, seed=2, empty_rows=(1, 3))
    kept = {k: v[[0, 2, 4]] for k, v in case.items()}
    kwargs = dict(loss_agg=loss_agg, kl_coef=0.1, entropy_coef=0.01, loss_agg_norm=None)
    full, _ = run(ppo_loss, case, **kwargs)
    without, _ = run(ppo_loss, kept, **kwargs)
    torch.testing.assert_close(full.loss, without.loss)
    assert full.stats["num_seqs"].item() == 3


def test_aggregation_by_hand():
    # One clipped-high token (A > 0, r = e^1 > 1.2) and one plain token (r = 1) in row 0; row 1 has
    # one plain token; row 2 is empty.
    logprobs = torch.tensor([[1.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    old = torch.zeros(3, 2)
    adv = torch.tensor([[2.0, -1.0], [3.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    pg = torch.tensor([-2.0 * 1.2, 1.0, -3.0])  # per valid token
    expect = {
        "token-mean": pg.sum() / 3,
        "seq-mean-token-mean": ((pg[0] + pg[1]) / 2 + pg[2]) / 2,
        "seq-mean-token-sum": ((pg[0] + pg[1]) + pg[2]) / 2,
        "seq-mean-token-sum-norm": ((pg[0] + pg[1]) / 2 + pg[2] / 2) / 2,
    }
    for agg, value in expect.items():
        out = ppo_loss(logprobs, old, adv, mask, loss_agg=agg)
        assert out.loss.item() == pytest.approx(value.item(), rel=1e-6), agg
        assert out.stats["clipfrac"].item() == pytest.approx(1 / 3)
        assert out.stats["clipfrac_high"].item() == pytest.approx(1 / 3)
        assert out.stats["clipfrac_low"].item() == 0
        assert out.stats["ratio_max"].item() == pytest.approx(2.718281828, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    case = make_case(4, 33, seed=5)
    kwargs = dict(kl_coef=0.05, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    out, grads = run(ppo_loss, case, dtype=dtype, **kwargs)
    assert out.loss.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads.values())
    low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in case.items()}  # the values the kernel saw
    ref, ref_grads = run(ppo_loss_reference, low, dtype=torch.float64, **kwargs)
    assert_outputs_close(out, ref)
    eps = torch.finfo(dtype).eps
    assert_grads_close(grads, ref_grads, rtol=eps, atol=1e-7)


@pytest.mark.parametrize("other_dtype", [torch.float16, torch.float32])
def test_fp16_gradients_saturate_instead_of_overflowing(other_dtype):
    # ratio = e^15 ~ 3.3e6 with A = -1 sits on the unclipped branch: d loss / d logprob = ratio / 2 ~ 1.6e6,
    # finite in float32 (as is the loss) but beyond float16's 65504; so is vf_coef * (v - R) / 2 ~ 1.3e5.
    # Gradients saturate at the largest finite float16 value instead of becoming inf.
    fp16_max = torch.finfo(torch.float16).max
    old = torch.tensor([[-20.0, -20.0, -1.0]])
    case = dict(
        logprobs=torch.tensor([[-5.0, -35.0, float("nan")]]),
        old_logprobs=old,
        advantages=torch.tensor([[-1.0, 1.0, 1.0]]),
        mask=torch.tensor([[True, True, False]]),
        values=torch.tensor([[64992.0, 0.0, 0.0]]),
        old_values=torch.tensor([[64992.0, 0.0, 0.0]]),
        returns=torch.tensor([[-64992.0, 0.0, 0.0]]),
    )
    half = {
        k: v.half() if k in ("logprobs", "values") else (v.to(other_dtype) if v.is_floating_point() else v)
        for k, v in case.items()
    }
    out, grads = run(ppo_loss, half, vf_coef=2.0)
    full, full_grads = run(
        ppo_loss, {k: v.float() if v.is_floating_point() else v for k, v in half.items()}, vf_coef=2.0
    )
    assert torch.isfinite(full.loss) and torch.isfinite(out.loss)
    assert full_grads["logprobs"][0, 0] > fp16_max and full_grads["values"][0, 0] > fp16_max  # the premise
    assert grads["logprobs"].dtype == grads["values"].dtype == torch.float16
    assert grads["logprobs"][0, 0].item() == fp16_max and grads["values"][0, 0].item() == fp16_max
    assert grads["logprobs"][0, 2].item() == 0  # masked
    ref, ref_grads = run(ppo_loss_reference, half, vf_coef=2.0)
    assert_grads_close(grads, ref_grads, rtol=1e-3, atol=0)


def test_no_nan_gradient_outside_the_log_ratio_clamp():
    # Found by tests/test_ops_fuzz.py: outside the clamp the kernels multiplied by a 0/1 indicator, so an
    # infinite advantage gave 0 * inf = NaN where torch's clamp (and the reference) select a zero gradient.
    inf = float("inf")
    case = dict(
        logprobs=torch.tensor([[1.8, -1.0]]),
        old_logprobs=torch.tensor([[inf, -1.2]]),
        advantages=torch.tensor([[-inf, 1.0]]),
        mask=torch.ones(1, 2, dtype=torch.bool),
        ref_logprobs=torch.tensor([[0.5, -1.1]]),
    )
    out, grads = run(ppo_loss, case, kl_coef=0.1, kl_estimator="k1")
    ref, ref_grads = run(ppo_loss_reference, case, kl_coef=0.1, kl_estimator="k1")
    assert torch.isfinite(grads["logprobs"]).all()
    assert grads["logprobs"][0, 0].item() == pytest.approx(0.1 / 2)  # only the KL term's gradient is left
    assert_grads_close(grads, ref_grads)


def test_a_nan_old_value_is_not_hidden_by_the_value_clip():
    # Found by tests/test_ops_fuzz.py: NaN clip bounds made the clamp pass the value through, so a NaN in
    # old_values gave a finite, plausible value loss (torch.clamp with NaN bounds, the reference, gives NaN).
    case = make_case(2, 5, seed=3, ref=False, entropy=False, empty_rows=())
    case["mask"].fill_(True)
    case["old_values"][1, 2] = float("nan")
    out, ref = call(ppo_loss, case), call(ppo_loss_reference, case)  # values, old_values, returns: no KL or entropy
    assert ref.value_loss.isnan() and out.value_loss.isnan() and out.loss.isnan()


def test_mixed_dtypes_are_upcast():
    case = make_case(3, 21, seed=8)
    mixed = dict(
        case, logprobs=case["logprobs"].bfloat16(), values=case["values"].half(), returns=case["returns"].double()
    )
    out, grads = run(ppo_loss, mixed, kl_coef=0.1)
    assert out.loss.dtype == torch.float64  # float64 among the inputs: float64 compute
    assert grads["logprobs"].dtype == torch.bfloat16 and grads["values"].dtype == torch.float16
    ref, ref_grads = run(ppo_loss_reference, mixed, dtype=torch.float64, kl_coef=0.1)
    assert_outputs_close(out, ref, rtol=1e-12, atol=1e-12)


def test_float64_matches_tightly_and_gradcheck():
    case = {k: (v.double() if v.is_floating_point() else v) for k, v in make_case(3, 11, seed=9).items()}
    kwargs = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.02, dual_clip=2.5, loss_agg="seq-mean-token-mean")
    out, grads = run(ppo_loss, case, **kwargs)
    ref, ref_grads = run(ppo_loss_reference, case, **kwargs)
    assert_outputs_close(out, ref, rtol=1e-12, atol=1e-13)
    assert_grads_close(grads, ref_grads, rtol=1e-12, atol=1e-14)

    def loss_of(logprobs, values, entropy):
        rest = {k: case[k] for k in ("old_values", "returns", "ref_logprobs")}
        return ppo_loss(
            logprobs,
            case["old_logprobs"],
            case["advantages"],
            case["mask"],
            values=values,
            entropy=entropy,
            **rest,
            **kwargs,
        ).loss

    leaves = [case[k].clone().requires_grad_() for k in GRAD_LEAVES]
    assert torch.autograd.gradcheck(loss_of, leaves)


def test_same_bits_for_any_thread_count():
    case = make_case(70, 1024, seed=11)  # 16 rows per block: five blocks
    kwargs = dict(kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(ppo_loss, case, **kwargs))
    finally:
        torch.set_num_threads(before)
    (a, ga), (b, gb) = results
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(a.stats[k], b.stats[k]) for k in a.stats)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


_ISA_SCRIPT = """
import sys, torch, rlhf_ext
from rlhf_ext.ops import ppo_loss
case = torch.load(sys.argv[1])
leaves = {k: case[k].requires_grad_() for k in ("logprobs", "values", "entropy")}
rest = {k: case[k] for k in ("old_values", "returns", "ref_logprobs")}
out = ppo_loss(case["logprobs"], case["old_logprobs"], case["advantages"], case["mask"], values=case["values"],
               entropy=case["entropy"], **rest, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
out.loss.backward()
torch.save({"loss": out.loss.detach(), "stats": out.stats, **{k: v.grad for k, v in leaves.items()}}, sys.argv[2])
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_instruction_set_variants_agree(tmp_path, capability):
    """The row kernels exist per ISA (baseline, AVX2, AVX-512); ATEN_CPU_CAPABILITY picks a narrower one
    in a fresh process. Only the lane count of the sums differs, so results agree to rounding."""
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    case = make_case(9, 300, seed=12)
    torch.save(case, tmp_path / "case.pt")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=120,
    )
    other = torch.load(tmp_path / "out.pt")
    out, grads = run(ppo_loss, case, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    torch.testing.assert_close(other["loss"], out.loss.detach(), rtol=1e-6, atol=1e-7)
    for k in STAT_NAMES:
        torch.testing.assert_close(other["stats"][k], out.stats[k], rtol=1e-6, atol=1e-7)
    for k in grads:
        torch.testing.assert_close(other[k], grads[k], rtol=1e-6, atol=1e-9)
