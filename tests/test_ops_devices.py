"""Every public op refuses tensors on a device without rlhf_ext kernels (meta) and tensors on mixed devices,
naming the argument, before dispatch: a meta tensor would otherwise reach the fake implementation and
return uninitialised memory, and mixed devices would run one device's kernel on the other's data."""

import pytest
import torch

from rlhf_ext import ops

_layer = ops.pack_decoder_layer(
    torch.ones(8),
    torch.randn(8, 8),
    torch.randn(4, 8),
    torch.randn(4, 8),
    torch.randn(8, 8),
    torch.ones(8),
    torch.randn(6, 8),
    torch.randn(6, 8),
    torch.randn(8, 6),
)  # one layer: H 8, 2 heads of 4, 1 kv head, intermediate 6


def _calls():
    """(op name, function of a tensor-argument dict, the dict on cpu). Each dict holds every tensor argument
    the call takes, so each one can be moved to another device in turn."""
    g = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 5, 7, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    per_token = {
        k: torch.randn(B, T, generator=g)
        for k in (
            "logprobs",
            "old_logprobs",
            "advantages",
            "values",
            "old_values",
            "returns",
            "ref_logprobs",
            "entropy",
        )
    }
    labels = torch.randint(0, V, (B,), generator=g)
    return [
        ("ppo_loss", lambda a: ops.ppo_loss(**a, kl_coef=0.1, entropy_coef=0.01), dict(per_token, mask=mask)),
        (
            "kl_penalty",
            lambda a: ops.kl_penalty(**a, estimator="k3"),
            {k: per_token[k] for k in ("logprobs", "ref_logprobs")},
        ),
        ("masked_mean", lambda a: ops.masked_mean(**a), dict(x=per_token["values"], mask=mask)),
        ("masked_mean(dim)", lambda a: ops.masked_mean(**a, dim=1), dict(x=per_token["values"], mask=mask)),
        ("masked_var", lambda a: ops.masked_var(**a), dict(x=per_token["values"], mask=mask)),
        ("masked_whiten", lambda a: ops.masked_whiten(**a), dict(x=per_token["values"], mask=mask)),
        (
            "gae",
            lambda a: ops.gae(**a, gamma=0.9, lam=0.9),
            dict(rewards=per_token["values"], values=per_token["returns"], mask=mask, last_values=torch.zeros(B)),
        ),
        ("gather_logprobs", lambda a: ops.gather_logprobs(**a), dict(logits=torch.randn(B, V), labels=labels)),
        (
            "fused_linear_logprobs",
            lambda a: ops.fused_linear_logprobs(**a),
            dict(hidden=torch.randn(B, H), weight=torch.randn(V, H), labels=labels, bias=torch.randn(V)),
        ),
        ("pack_linear_weight", lambda a: ops.pack_linear_weight(**a), dict(weight=torch.randn(V, H))),
        (
            "packed_linear",
            lambda a: ops.packed_linear(**a, out_features=V),
            dict(input=torch.randn(B, H), packed=ops.pack_linear_weight(torch.randn(V, H)), bias=torch.randn(V)),
        ),
        (
            "pack_decoder_layer",
            lambda a: ops.pack_decoder_layer(**a),
            dict(
                input_norm=torch.ones(8),
                q=torch.randn(8, 8),
                k=torch.randn(4, 8),
                v=torch.randn(4, 8),
                o=torch.randn(8, 8),
                post_norm=torch.ones(8),
                gate=torch.randn(6, 8),
                up=torch.randn(6, 8),
                down=torch.randn(8, 6),
            ),
        ),
        (
            "decode_step",
            lambda a: ops.decode_step(**a, slot=2, weights=_layer, num_heads=2, eps=1e-6, scaling=0.5),
            dict(
                hidden=torch.randn(B, 8),
                cos=torch.randn(B, 4),
                sin=torch.randn(B, 4),
                key_cache=torch.randn(1, B, 1, 3, 4),
                value_cache=torch.randn(1, B, 1, 3, 4),
                key_mask=torch.ones(B, 3, dtype=torch.bool),
                final_norm=torch.ones(8),
            ),
        ),
        (
            "sample",
            lambda a: ops.sample(**a),
            dict(
                logits=torch.randn(B, V),
                temperature=torch.ones(B),
                top_k=torch.full((B,), 3),
                top_p=torch.full((B,), 0.9),
            ),
        ),
    ]


CALLS = _calls()
CASES = [(name, fn, args, moved) for name, fn, args in CALLS for moved in args]


def test_every_public_op_is_covered():
    tested = {name.split("(")[0] for name, _, _ in CALLS}
    assert tested == set(ops.__all__) - {"PPOLossOutput"}


@pytest.mark.parametrize("name, fn, args", CALLS, ids=[c[0] for c in CALLS])
def test_cpu_call_works(name, fn, args):
    fn(args)  # the baseline the cases below perturb is a valid call


@pytest.mark.parametrize("name, fn, args, moved", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_one_argument_on_meta_is_named(name, fn, args, moved):
    bad = dict(args, **{moved: args[moved].to("meta")})
    first = next(iter(args))
    if moved == first or (name == "sample"):
        # The reference argument itself (or a sampling setting, which follows logits' device).
        match = rf"{moved}: expected a tensor on (cpu or cuda|cpu \(the device of logits\)).*got one on meta"
    else:
        match = rf"{moved}: expected a tensor on cpu \(the device of {first}\), got one on meta"
    with pytest.raises(RuntimeError, match=match):
        fn(bad)


@pytest.mark.parametrize("name, fn, args", CALLS, ids=[c[0] for c in CALLS])
def test_all_arguments_on_meta_are_refused(name, fn, args):
    first = next(iter(args))
    meta = {k: v.to("meta") for k, v in args.items()}
    with pytest.raises(RuntimeError, match=rf"{first}: expected a tensor on cpu or cuda .*got one on meta"):
        fn(meta)
