"""Shared inputs and comparisons of the ppo_loss tests (tests/test_ppo_loss*.py)."""

import torch

from rlhf_ext.ops.ppo_loss import STAT_NAMES

LOSS_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
OPTIONAL = ("values", "old_values", "returns", "ref_logprobs", "entropy")
GRAD_LEAVES = ("logprobs", "values", "entropy")


def make_case(
    B, T, *, seed, spread=0.5, holes=0.25, empty_rows=(1,), values=True, ref=True, entropy=True, extreme=False
):
    """Per-token tensors [B, T] in float32. spread: std of logprobs - old_logprobs (0.5 puts a good share
    of ratios outside [0.8, 1.2]); extreme: log-prob differences uniform in ±50 and advantages ±100."""
    g = torch.Generator().manual_seed(seed)
    old = -4 * torch.rand(B, T, generator=g)
    delta = (100 * torch.rand(B, T, generator=g) - 50) if extreme else spread * torch.randn(B, T, generator=g)
    case = {
        "logprobs": old + delta,
        "old_logprobs": old,
        "advantages": torch.randn(B, T, generator=g) * (100 if extreme else 1),
        "mask": torch.rand(B, T, generator=g) > holes,
    }
    for r in empty_rows:
        if r < B:
            case["mask"][r] = False
    if values:
        case["old_values"] = torch.randn(B, T, generator=g)
        case["values"] = case["old_values"] + 0.4 * torch.randn(B, T, generator=g)
        case["returns"] = torch.randn(B, T, generator=g)
    if ref:
        case["ref_logprobs"] = case["logprobs"] + (
            (100 * torch.rand(B, T, generator=g) - 50) if extreme else 0.3 * torch.randn(B, T, generator=g)
        )
    if entropy:
        case["entropy"] = 3 * torch.rand(B, T, generator=g)
    return case


def call(fn, case, **kwargs):
    """fn (ppo_loss or its reference) on a make_case() dict: its four required tensors, the optional ones it holds."""
    optional = {k: case[k] for k in OPTIONAL if k in case}
    return fn(case["logprobs"], case["old_logprobs"], case["advantages"], case["mask"], **optional, **kwargs)


def run(fn, case, dtype=None, **kwargs):
    """Calls fn on fresh leaves (cast to dtype if given); returns (output, grads of loss by leaf name)."""
    t = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()) for k, v in case.items()}
    leaves = {k: t[k].requires_grad_() for k in GRAD_LEAVES if k in t}
    out = call(fn, t, **kwargs)
    grads = torch.autograd.grad(out.loss, list(leaves.values()))
    return out, dict(zip(leaves, grads))


def assert_outputs_close(out, ref, rtol=1e-5, atol=1e-6):
    for name in ("loss", "policy_loss", "value_loss", "kl", "entropy"):
        a, b = getattr(out, name), getattr(ref, name)
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    # The reference names its statistics itself: the op must report exactly those.
    assert list(out.stats) == list(ref.stats) == list(STAT_NAMES)
    for key in STAT_NAMES:
        torch.testing.assert_close(
            out.stats[key].double(), ref.stats[key].double(), rtol=rtol, atol=atol, msg=lambda m: f"stats[{key}]: {m}"
        )


def assert_grads_close(grads, ref_grads, rtol=1e-5, atol=1e-7):
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name].double(), ref_grads[name].double(), rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}"
        )
