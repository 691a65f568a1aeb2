"""Each public op in `rlhf_ext.ops` and its plain-PyTorch twin `<name>_reference` in `rlhf_ext/ops/reference.py`
take the same parameters: the same names in the same order, of the same kind (positional / keyword-only), with the
same defaults. Tests and benchmarks call both with one set of arguments, so a default changed on one side only
would compare two different computations. The parameters only one side has are listed below, each with its reason.
"""

import inspect

import pytest

from rlhf_ext import ops
from rlhf_ext.ops import reference

# op name -> (parameters only the op has, parameters only the reference has)
DELIBERATE = {
    # The op can overwrite the logits' buffer with their gradient (memory); the oracle can compute in float64.
    "gather_logprobs": ({"inplace_backward"}, {"dtype"}),
    # The op projects `chunk_size` rows at a time to bound memory; the oracle builds the logits whole, optionally
    # in float64.
    "fused_linear_logprobs": ({"chunk_size"}, {"dtype"}),
    # The op can also return the log-probs of the filtered distribution (what the rollout engine records).
    "sample": ({"return_filtered_logprobs"}, set()),
}

OPS = sorted(name for name in ops.__all__ if inspect.isfunction(getattr(ops, name)))


def test_every_public_op_is_checked():
    assert set(OPS) == {
        "fused_linear_logprobs",
        "gae",
        "gather_logprobs",
        "kl_penalty",
        "masked_mean",
        "masked_var",
        "masked_whiten",
        "decode_step",
        "pack_decoder_layer",
        "pack_linear_weight",
        "packed_linear",
        "ppo_loss",
        "sample",
    }
    assert set(DELIBERATE) <= set(OPS)


@pytest.mark.parametrize("name", OPS)
def test_op_and_reference_twin_share_their_parameters(name):
    twin = getattr(reference, f"{name}_reference", None)
    assert twin is not None, f"rlhf_ext/ops/reference.py has no {name}_reference, the twin of rlhf_ext.ops.{name}"
    op_params = inspect.signature(getattr(ops, name)).parameters
    ref_params = inspect.signature(twin).parameters
    op_only, ref_only = DELIBERATE.get(name, (set(), set()))
    assert set(op_params) - set(ref_params) == op_only, f"{name}: parameters only the op has"
    assert set(ref_params) - set(op_params) == ref_only, f"{name}: parameters only the reference has"
    shared = [p for p in op_params if p in ref_params]
    assert shared == [p for p in ref_params if p in op_params], f"{name}: shared parameters in another order"
    for param in shared:
        ours, theirs = op_params[param], ref_params[param]
        assert ours.kind == theirs.kind, f"{name}({param}): {ours.kind} vs {theirs.kind} in the reference"
        assert ours.default == theirs.default, f"{name}({param}): default {ours.default!r} vs {theirs.default!r}"
