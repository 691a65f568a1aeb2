"""Op fuzzing: random dtypes, shapes (0-size and odd), devices (cpu / meta), strides (transposed, strided,
expanded) and values (inf / NaN / huge) for every public op of rlhf_ext.ops.

Each call must either raise a clear error -- ValueError, TypeError or RuntimeError whose message starts with
the name of one of the op's arguments -- or match its twin in rlhf_ext/ops/reference.py: non-finite exactly
where the reference is non-finite, and within per-dtype tolerances elsewhere. Any other exception, a crash or
a differing result fails. Derandomized with a bounded number of examples so CI is deterministic and quick;
RLHF_EXT_FUZZ_EXAMPLES=2000 RLHF_EXT_FUZZ_RANDOM=1 explore further by hand (RLHF_EXT_FUZZ_SHRINK=1 minimises
a failing example).
"""

import math
import os
import re

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rlhf_ext import ops
from rlhf_ext.ops import reference as ref

FUZZ = settings(
    max_examples=int(os.environ.get("RLHF_EXT_FUZZ_EXAMPLES", 60)),
    deadline=None,
    database=None,
    derandomize=os.environ.get("RLHF_EXT_FUZZ_RANDOM") != "1",
    print_blob=True,
    # Shrinking a failure can take minutes; the failing example is printed either way.
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([Phase.shrink] if os.environ.get("RLHF_EXT_FUZZ_SHRINK") else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Magnitudes that stay finite in the dtype but overflow float32 arithmetic as soon as they are squared.
HUGE = {torch.float32: 1e30, torch.float64: 1e300, torch.bfloat16: 1e30, torch.float16: 6e4}
# Relative tolerance of a result computed from inputs of each dtype (float32 arithmetic for bf16/fp16).
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
ERRORS = (ValueError, TypeError, RuntimeError)

float_dtypes = st.sampled_from(FLOATS)
# Mostly float dtypes; sometimes one the ops must refuse by name.
any_dtypes = st.sampled_from(FLOATS * 4 + [torch.int64, torch.bool])


def fuzz(**strategies):
    """A fuzz test: FUZZ's settings over `strategies`, and `data` (st.data()) to draw tensors whose shapes and
    dtypes depend on the drawn arguments."""

    def decorate(test):
        return FUZZ(given(data=st.data(), **strategies)(test))

    return decorate


@st.composite
def tensors(draw, shape, dtype, special=True, scale=1.0, layouts=True):
    """A tensor of `shape` and `dtype` with normal values times `scale`, up to three special values
    (inf, -inf, NaN, +-huge, 0) and a random memory layout with the same logical values."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    numel = values.numel()
    if special and numel:
        flat = values.view(-1)
        huge = HUGE.get(dtype, 1e30)
        for _ in range(draw(st.integers(0, 3))):
            flat[draw(st.integers(0, numel - 1))] = draw(
                st.sampled_from([math.inf, -math.inf, math.nan, huge, -huge, 0.0])
            )
    t = values.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"])) if layouts else "contiguous"
    if layout == "transposed" and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided" and t.dim() >= 1:
        big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    elif layout == "expanded" and t.dim() >= 1 and shape[0] >= 1:
        t = t[:1].expand(shape)
    return t


@st.composite
def masks(draw, shape):
    """bool or 0/1 float masks with holes, sometimes all False or all True."""
    kind = draw(st.sampled_from(["random", "random", "none", "all"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    m = torch.rand(shape, generator=gen) > 0.3 if kind == "random" else torch.full(shape, kind == "all")
    return m.float() if draw(st.booleans()) and draw(st.booleans()) else m


def maybe_meta(draw, args, rate=8):
    """Moves one tensor argument to the meta device, once in `rate` examples."""
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    if names and draw(st.integers(0, rate - 1)) == 0:
        name = draw(st.sampled_from(names))
        args[name] = args[name].to("meta")
    return args


def call(fn, arg_names):
    """fn()'s result, or None if it raised a clear error: an expected type whose message starts with
    `<argument>:` (or `<argument> and <argument>:`). Anything else propagates and fails the test."""
    try:
        return fn()
    except ERRORS as e:
        msg = str(e)
        named = re.match(r"\s*(\w+)(?: and (\w+))?: ", msg)
        assert named and named.group(1) in arg_names, f"unclear {type(e).__name__}: {msg[:400]}"
        return None


def assert_matches(got, expected, rtol, scale=1.0, what="output"):
    """Same shape; non-finite exactly where `expected` is; elsewhere within rtol, relative to the value or
    to `scale` (the magnitude of the terms summed into it)."""
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(expected)
    bad = torch.isfinite(got) != finite
    assert not bad.any(), f"{what}: finite where the reference is not, or back: {got[bad][:5]} vs {expected[bad][:5]}"
    torch.testing.assert_close(
        got[finite], expected[finite], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def finite_scale(*ts):
    """The largest finite magnitude among the tensors (1 at least): the absolute error of a sum scales with it."""
    mags = [t.detach().double().abs()[torch.isfinite(t.detach().double())] for t in ts if t is not None]
    return max([1.0] + [m.max().item() for m in mags if m.numel()])


# ---- gae ----


@fuzz(
    B=st.integers(0, 4),
    T=st.integers(0, 9),
    dtype=any_dtypes,
    gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0, math.nan, 1.5]),
    lam=st.sampled_from([0.0, 0.95, 1.0, -0.1]),
    bootstrap=st.booleans(),
    values_dtype_differs=st.integers(0, 5),
)
def test_fuzz_gae(data, B, T, dtype, gamma, lam, bootstrap, values_dtype_differs):
    values_dtype = data.draw(any_dtypes) if values_dtype_differs == 0 else dtype
    args = dict(
        rewards=data.draw(tensors((B, T), dtype)),
        values=data.draw(tensors((B, T), values_dtype)),
        mask=data.draw(masks((B, T))),
        last_values=data.draw(tensors((B,), dtype)) if bootstrap else None,
    )
    args = maybe_meta(data.draw, args)
    out = call(lambda: ops.gae(**args, gamma=gamma, lam=lam), set(args) | {"gamma", "lam"})
    if out is None:
        return
    expected = ref.gae_reference(**args, gamma=gamma, lam=lam)
    scale = finite_scale(args["rewards"], args["values"], args["last_values"]) * max(1, T)
    for name, got, exp in zip(("advantages", "returns"), out, expected):
        assert got.dtype == exp.dtype
        assert_matches(got, exp, RTOL[dtype], scale, name)


# ---- masked moments / whitening ----


@fuzz(
    shape=st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 9), (4, 1), (3, 0), (1, 300)]),
    dtype=any_dtypes,
    op=st.sampled_from(["mean", "mean_dim", "var", "var_biased", "whiten", "whiten_noshift"]),
    mask_shape_differs=st.integers(0, 9),
)
def test_fuzz_masked_stats(data, shape, dtype, op, mask_shape_differs):
    mask_shape = (shape[0] + 1,) + shape[1:] if mask_shape_differs == 0 else shape
    args = maybe_meta(data.draw, dict(x=data.draw(tensors(shape, dtype)), mask=data.draw(masks(mask_shape))))
    fns = {
        "mean": (ops.masked_mean, ref.masked_mean_reference, {}),
        "mean_dim": (ops.masked_mean, ref.masked_mean_reference, dict(dim=-1)),
        "var": (ops.masked_var, ref.masked_var_reference, {}),
        "var_biased": (ops.masked_var, ref.masked_var_reference, dict(unbiased=False)),
        "whiten": (ops.masked_whiten, ref.masked_whiten_reference, {}),
        "whiten_noshift": (ops.masked_whiten, ref.masked_whiten_reference, dict(shift_mean=False)),
    }
    fn, twin, kwargs = fns[op]
    out = call(lambda: fn(**args, **kwargs), set(args))
    if out is None:
        return
    expected = twin(**args, **kwargs)
    scale = min(finite_scale(args["x"]), 1e150) ** (2 if op.startswith("var") else 1) * 100
    # Whitening divides by the standard deviation: its error relative to the output grows with the ratio of the
    # values' magnitude to their spread, so it is compared relative to that ratio.
    if op.startswith("whiten"):
        spread = ref.masked_var_reference(args["x"], args["mask"]).abs().sqrt().item()
        scale = 100 * finite_scale(args["x"]) / max(spread, 1e-4) if math.isfinite(spread) else scale
    assert_matches(out, expected, RTOL[dtype] * 10, scale, op)


# ---- kl_penalty / ppo_loss ----


@fuzz(
    shape=st.sampled_from([(0,), (5,), (2, 3), (3, 0), (2, 9), (1, 2, 3)]),
    dtype=any_dtypes,
    mixed=st.integers(0, 4),
    estimator=st.sampled_from(["k1", "k2", "k3", "k3", "low_var_kl"]),
    max_log_ratio=st.sampled_from([20.0, 20.0, 0.5, 100.0, math.nan]),
)
def test_fuzz_kl_penalty(data, shape, dtype, mixed, estimator, max_log_ratio):
    ref_dtype = data.draw(float_dtypes) if mixed == 0 else dtype
    args = maybe_meta(
        data.draw,
        dict(
            logprobs=data.draw(tensors(shape, dtype, scale=5.0)),
            ref_logprobs=data.draw(tensors(shape, ref_dtype, scale=5.0)),
        ),
    )
    out = call(
        lambda: ops.kl_penalty(**args, estimator=estimator, max_log_ratio=max_log_ratio),
        set(args) | {"estimator", "max_log_ratio"},
    )
    if out is None:
        return
    expected = ref.kl_penalty_reference(**args, estimator=estimator, max_log_ratio=max_log_ratio)
    assert out.dtype == expected.dtype
    assert_matches(out, expected, RTOL[dtype] * 5, 1.0, "kl")


PPO_TENSORS = ("values", "old_values", "returns", "ref_logprobs", "entropy")


@fuzz(
    B=st.integers(0, 3),
    T=st.integers(0, 7),
    dtype=any_dtypes,
    mixed=st.integers(0, 5),
    with_values=st.booleans(),
    with_ref=st.booleans(),
    with_entropy=st.booleans(),
    per_sequence_advantages=st.integers(0, 4),
    scalars=st.fixed_dictionaries(
        dict(
            loss_agg=st.sampled_from(
                ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
            ),
            kl_estimator=st.sampled_from(["k1", "k2", "k3"]),
            dual_clip=st.sampled_from([None, None, 3.0, 0.5]),
            cliprange=st.sampled_from([0.2, 0.2, 0.0, 1.5]),
            cliprange_value=st.sampled_from([0.2, None]),
            max_log_ratio=st.sampled_from([20.0, 20.0, 5.0, 1e3]),
        )
    ),
)
def test_fuzz_ppo_loss(data, B, T, dtype, mixed, with_values, with_ref, with_entropy, per_sequence_advantages, scalars):
    """scalars: ppo_loss's clipping, aggregation and KL arguments; the coefficients follow the terms present."""

    def draw_dtype():
        return data.draw(any_dtypes) if mixed == 0 else dtype

    args = dict(
        logprobs=data.draw(tensors((B, T), dtype, scale=3.0)),
        old_logprobs=data.draw(tensors((B, T), draw_dtype(), scale=3.0)),
        advantages=data.draw(tensors((B,) if per_sequence_advantages == 0 else (B, T), draw_dtype())),
        mask=data.draw(masks((B, T))),
    )
    present = dict(
        values=with_values, old_values=with_values, returns=with_values, ref_logprobs=with_ref, entropy=with_entropy
    )
    for name in PPO_TENSORS:
        if present[name]:
            args[name] = data.draw(tensors((B, T), draw_dtype()))
    args = maybe_meta(data.draw, args)
    leaves = {
        k: args[k].detach().clone().requires_grad_()
        for k in ("logprobs", "values", "entropy")
        if k in args and args[k].is_floating_point() and args[k].device.type == "cpu"
    }
    kwargs = dict(scalars, vf_coef=0.5, kl_coef=0.1 if with_ref else 0.0, entropy_coef=0.01 if with_entropy else 0.0)
    out = call(lambda: ops.ppo_loss(**dict(args, **leaves), **kwargs), set(args) | set(kwargs))
    if out is None:
        return
    grads = torch.autograd.grad(out.loss, list(leaves.values())) if leaves else ()
    ref_leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    if per_sequence_advantages == 0:  # the wrapper broadcasts [B] advantages over the tokens
        args["advantages"] = args["advantages"].reshape(-1, 1).expand(B, T)
    expected = ref.ppo_loss_reference(**dict(args, **ref_leaves), **kwargs)
    expected_grads = torch.autograd.grad(expected.loss, list(ref_leaves.values())) if ref_leaves else ()
    rtol = max(RTOL[t.dtype] for t in args.values() if t.is_floating_point()) * 10
    # Terms reach |A| * ratio and (v - R)^2 per token: absolute errors scale with the largest of them.
    ratio_max = expected.stats["ratio_max"].item()
    ratio_max = ratio_max if math.isfinite(ratio_max) else 1.0
    scale = min(finite_scale(*args.values()), 1e150) ** 2 * max(1.0, ratio_max)
    for name in ("loss", "policy_loss", "value_loss", "kl", "entropy"):
        assert_matches(getattr(out, name), getattr(expected, name), rtol, scale, name)
    if not torch.isfinite(expected.loss):
        return  # a non-finite loss (matched above) stops training; its statistics and gradients carry no contract
    for key, value in out.stats.items():
        assert_matches(value, expected.stats[key], rtol, scale, f"stats[{key}]")
    for name, got, exp in zip(leaves, grads, expected_grads):
        assert got.dtype == leaves[name].dtype
        assert_matches(got, exp, max(rtol, torch.finfo(got.dtype).eps), scale, f"grad {name}")


# ---- logprobs ----


@fuzz(
    rows=st.sampled_from([(0,), (1,), (3,), (2, 3), (5,)]),
    V=st.integers(0, 9),
    dtype=any_dtypes,
    temperature=st.sampled_from([1.0, 1.0, 0.7, 2.5, 0.0, -1.0, math.nan]),
    label_kind=st.sampled_from(["valid", "valid", "ignored", "out_of_range", "int32"]),
    return_entropy=st.booleans(),
)
def test_fuzz_gather_logprobs(data, rows, V, dtype, temperature, label_kind, return_entropy):
    logits = data.draw(tensors(rows + (V,), dtype, scale=4.0))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    labels = torch.randint(0, max(V, 1), rows, generator=gen)
    if label_kind == "ignored" and labels.numel():
        labels.view(-1)[0] = -100
    elif label_kind == "out_of_range" and labels.numel():
        labels.view(-1)[-1] = V + data.draw(st.integers(0, 3))
    elif label_kind == "int32":
        labels = labels.int()
    args = maybe_meta(data.draw, dict(logits=logits, labels=labels))
    leaf = (
        args["logits"].detach().clone().requires_grad_()
        if args["logits"].is_floating_point() and args["logits"].device.type == "cpu"
        else args["logits"]
    )
    out = call(
        lambda: ops.gather_logprobs(leaf, args["labels"], temperature=temperature, return_entropy=return_entropy),
        set(args) | {"temperature"},
    )
    if out is None:
        return
    twin_leaf = leaf.detach().clone().requires_grad_()
    expected = ref.gather_logprobs_reference(
        twin_leaf, args["labels"], temperature=temperature, return_entropy=return_entropy
    )
    outs, exps = (out, expected) if return_entropy else ((out,), (expected,))
    scale = finite_scale(args["logits"]) / temperature
    for name, got, exp in zip(("logprobs", "entropy"), outs, exps):
        assert_matches(got, exp, RTOL[dtype] * 10, scale, name)
    weights = [torch.linspace(-1, 1, o.numel()).reshape(o.shape).to(o.dtype) for o in outs]
    if outs[0].numel() and all(torch.isfinite(o).all() for o in outs):
        grad = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaf)[0]
        exp_grad = torch.autograd.grad(sum((o * w).sum() for o, w in zip(exps, weights)), twin_leaf)[0]
        assert torch.isfinite(grad).all(), f"non-finite gradient of finite log-probs: {grad}"
        # Beyond |logits / T| ~ 1e4 the float32 lse = max + log(sum) absorbs log(sum) (an ulp of the max
        # exceeds it), so probabilities, and the gradient, are only as exact as that ulp allows.
        if scale <= 1e4:
            assert_matches(grad, exp_grad, max(RTOL[dtype] * 10, torch.finfo(dtype).eps), 1.0, "grad logits")


@fuzz(
    rows=st.sampled_from([(0,), (1,), (4,), (2, 3)]),
    H=st.integers(0, 5),
    V=st.integers(0, 7),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    weight_dtype_differs=st.integers(0, 6),
    with_bias=st.booleans(),
    chunk_size=st.sampled_from([None, 1, 3, 0]),
    return_entropy=st.booleans(),
)
def test_fuzz_fused_linear_logprobs(
    data, rows, H, V, dtype, weight_dtype_differs, with_bias, chunk_size, return_entropy
):
    weight_dtype = data.draw(any_dtypes) if weight_dtype_differs == 0 else dtype
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    args = dict(
        hidden=data.draw(tensors(rows + (H,), dtype, special=False)),
        weight=data.draw(tensors((V, H), weight_dtype, special=False)),
        labels=torch.randint(0, max(V, 1), rows, generator=gen),
        bias=data.draw(tensors((V,), weight_dtype, special=False)) if with_bias else None,
    )
    args = maybe_meta(data.draw, args)
    leaves = {
        k: args[k].detach().clone().requires_grad_()
        for k in ("hidden", "weight", "bias")
        if args[k] is not None and args[k].is_floating_point() and args[k].device.type == "cpu"
    }
    out = call(
        lambda: ops.fused_linear_logprobs(**dict(args, **leaves), chunk_size=chunk_size, return_entropy=return_entropy),
        set(args) | {"chunk_size"},
    )
    if out is None:
        return
    twins = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    expected = ref.fused_linear_logprobs_reference(**dict(args, **twins), return_entropy=return_entropy)
    outs, exps = (out, expected) if return_entropy else ((out,), (expected,))
    # bf16 logits are rounded by the matmul itself, in chunks of another size than the reference's.
    rtol = 2e-2 if dtype == torch.bfloat16 else RTOL[dtype] * 10
    for name, got, exp in zip(("logprobs", "entropy"), outs, exps):
        assert_matches(got, exp, rtol, 10.0, name)
    if outs[0].numel():
        grads = torch.autograd.grad(sum(o.sum() for o in outs), list(leaves.values()))
        exp_grads = torch.autograd.grad(sum(o.sum() for o in exps), list(twins.values()))
        for name, got, exp in zip(leaves, grads, exp_grads):
            assert_matches(got, exp, rtol, 10.0 * max(1, outs[0].numel()), f"grad {name}")


# ---- sample ----


@fuzz(
    B=st.integers(0, 4),
    V=st.integers(0, 9),
    dtype=any_dtypes,
    temperature=st.sampled_from([1.0, 0.0, 0.6, 1e-45, -1.0, "rows"]),
    top_k=st.sampled_from([0, 0, 1, 3, 2**63, -1, "rows"]),
    top_p=st.sampled_from([1.0, 1.0, 0.5, 0.0, "rows"]),
    min_p=st.sampled_from([0.0, 0.0, 0.2, 1.5]),
    special=st.booleans(),
)
def test_fuzz_sample(data, B, V, dtype, temperature, top_k, top_p, min_p, special):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    logits = data.draw(tensors((B, V), dtype, special=special, scale=3.0))
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    for name, value in settings.items():
        if value == "rows":  # per-row settings [B]
            settings[name] = {
                "temperature": torch.rand(B, generator=gen) * 2,
                "top_k": torch.randint(0, 4, (B,), generator=gen),
                "top_p": torch.rand(B, generator=gen) * 0.9 + 0.1,
            }[name]
    args = maybe_meta(data.draw, dict(logits=logits, **settings))
    out = call(
        lambda: ops.sample(**args, min_p=min_p, generator=gen, return_filtered_logprobs=True), set(args) | {"min_p"}
    )
    if out is None:
        return
    tokens, logprobs, filtered = out
    assert tokens.shape == logprobs.shape == filtered.shape == (B,)
    if B == 0:
        return
    assert ((tokens >= 0) & (tokens < V)).all()
    args = {k: v for k, v in args.items() if k != "logits"}
    probs = ref.filtered_probs_reference(logits, **args, min_p=min_p)
    picked = probs.gather(1, tokens[:, None]).squeeze(1)
    assert (picked > 0).all(), "a token outside the reference's kept set was drawn"
    temps = ref._per_row(args["temperature"], B, torch.float32, logits.device)
    z = logits.float() / torch.where(temps == 0, torch.ones_like(temps), temps)[:, None]
    expected = torch.log_softmax(z, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    assert_matches(logprobs, expected, 1e-5, finite_scale(z), "logprobs")
    assert_matches(filtered, picked.log().float(), 1e-4, 1.0, "filtered_logprobs")
