"""Fused PPO / GRPO loss: clipped policy loss, value loss, KL, entropy bonus and the usual statistics
in one forward kernel and one backward kernel, with every statistic left on the device (no `.item()`).

Per valid token (`mask` set), all in float32 (float64 for float64 inputs) whatever the input dtype:

- policy: `r = exp(clamp(logprobs - old_logprobs, ±max_log_ratio))`,
  `pg = max(-A·r, -A·clip(r, 1 - cliprange, 1 + (cliprange_high or cliprange)))`; with
  `dual_clip = c > 1` and `A < 0`, `pg = min(pg, -A·c)`.
- value (when `values` is given): `0.5·max((v - R)², (clamp(v, v_old - cliprange_value,
  v_old + cliprange_value) - R)²)`; `cliprange_value=None` gives the unclipped `0.5·(v - R)²`.
- KL (when `ref_logprobs` is given; it enters the loss times `kl_coef`, and is reported even when
  `kl_coef == 0`): with `d = logprobs - ref_logprobs`, `k1 = d`, `k2 = d²/2`,
  `k3 = exp(-d) + d - 1` where `-d` is clamped to `±max_log_ratio` (k3 is the only estimator that
  exponentiates, hence the only one clamped; `kl_penalty` uses the same formulas).
- entropy (when `entropy` is given): the per-token entropy, entering the loss as a bonus.

Aggregation (`loss_agg`), the same for all four terms: `token-mean` (sum over the batch's valid
tokens / their number), `seq-mean-token-mean` (per-row mean over its valid tokens, then mean over
rows), `seq-mean-token-sum` (per-row sum, mean over rows), `seq-mean-token-sum-norm` (Dr.GRPO:
per-row sum / `loss_agg_norm` (default T = mask.shape[1]), mean over rows). In the seq-mean modes,
rows without a valid token are left out of the mean over rows. An entirely empty mask gives a loss
of 0 with zero gradients and all statistics 0 (never NaN).

`loss = policy_loss + vf_coef·value_loss + kl_coef·kl - entropy_coef·entropy`. Gradients flow to
`logprobs`, `values` and `entropy` only; the other tensors are targets (detached here). They are
computed in float32 (float64) and stored in each input's dtype; a finite gradient beyond that dtype's
range (float16: 65504, reached at ratios near `max_log_ratio`) saturates at its largest finite value
instead of overflowing to inf.

Statistics (`stats`) are token means over the valid tokens whatever `loss_agg` is: `clipfrac`
(the clipped branch is the larger one), `clipfrac_low` (clipped with r < 1 - cliprange, A < 0),
`clipfrac_high` (clipped with r > 1 + cliprange_high, A > 0), `dual_clipfrac` (capped by dual clip),
`approxkl` (mean ½·log(r)²), `approxkl_k3` (mean r - 1 - log r), `ratio_mean`, `ratio_max`
(max over valid tokens), `value_clipfrac` (the clipped value branch is the larger one), plus
`num_tokens` and `num_seqs` (rows with a valid token). Masked positions are never read into any sum,
so inf/NaN there (padding) cannot leak into the loss.
"""

import inspect
from typing import NamedTuple, Optional

import torch

from rlhf_ext.ops._common import as_bool_mask, check_devices, check_tensor

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Entries of the op's output vector (csrc/maths/ppo_loss.h `Out`), from index 5 on: the statistics.
_OUT_NAMES = (
    "loss",
    "policy_loss",
    "value_loss",
    "kl",
    "entropy",
    "clipfrac",
    "clipfrac_low",
    "clipfrac_high",
    "dual_clipfrac",
    "approxkl",
    "approxkl_k3",
    "ratio_mean",
    "ratio_max",
    "value_clipfrac",
    "num_tokens",
    "num_seqs",
)
_NUM_OUT = len(_OUT_NAMES)
# What `ppo_loss(...).stats` holds, in the op's order.
STAT_NAMES = _OUT_NAMES[5:]
# The op's tensor arguments, in the order of its schema (csrc/ops.cpp); its scalars follow them.
TENSOR_ARGS = (
    "logprobs",
    "old_logprobs",
    "advantages",
    "mask",
    "values",
    "old_values",
    "returns",
    "ref_logprobs",
    "entropy",
)
# Forward op inputs that get a gradient, and their positions in its argument list.
_GRAD_INPUTS = {name: TENSOR_ARGS.index(name) for name in ("logprobs", "values", "entropy")}
_NUM_ARGS = 20


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable wrt logprobs, values, entropy
    policy_loss: torch.Tensor  # 0-dim, detached
    value_loss: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    stats: dict[str, torch.Tensor]  # 0-dim device tensors, detached


def _compute_dtype(tensors) -> torch.dtype:
    """Mirror of the kernels' rule: the common dtype, else float64 if any, else float32."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _out_dtype(tensors) -> torch.dtype:
    return torch.float64 if _compute_dtype(tensors) == torch.float64 else torch.float32


@torch.library.register_fake("rlhf_ext::ppo_loss")
def _ppo_loss_fake(
    logprobs, old_logprobs, advantages, mask, values, old_values, returns, ref_logprobs, entropy, *scalars
):
    tensors = (logprobs, old_logprobs, advantages, values, old_values, returns, ref_logprobs, entropy)
    return logprobs.new_empty((_NUM_OUT,), dtype=_out_dtype(tensors))


@torch.library.register_fake("rlhf_ext::ppo_loss_backward")
def _ppo_loss_backward_fake(grad_out, out, *args):
    # args: the forward's 20 arguments; only the three gradient inputs shape the result.
    logprobs, values, entropy = (args[i] for i in _GRAD_INPUTS.values())
    absent = logprobs.new_empty((0,))
    return (
        torch.empty_like(logprobs, memory_format=torch.contiguous_format),
        torch.empty_like(values, memory_format=torch.contiguous_format) if values is not None else absent,
        torch.empty_like(entropy, memory_format=torch.contiguous_format) if entropy is not None else absent,
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9], output)
    ctx.scalars = inputs[9:]
    ctx.has = {name: inputs[i] is not None for name, i in _GRAD_INPUTS.items()}


def _backward(ctx, grad_out):
    *tensors, out = ctx.saved_tensors
    grad_logprobs, grad_values, grad_entropy = torch.ops.rlhf_ext.ppo_loss_backward(
        grad_out, out, *tensors, *ctx.scalars
    )
    grads = [None] * _NUM_ARGS
    grads[_GRAD_INPUTS["logprobs"]] = grad_logprobs
    if ctx.has["values"]:
        grads[_GRAD_INPUTS["values"]] = grad_values
    if ctx.has["entropy"]:
        grads[_GRAD_INPUTS["entropy"]] = grad_entropy
    return tuple(grads)


torch.library.register_autograd("rlhf_ext::ppo_loss", _backward, setup_context=_setup_context)


@torch.library.register_fake("rlhf_ext::kl_penalty")
def _kl_penalty_fake(logprobs, ref_logprobs, estimator, max_log_ratio):
    dtype = _out_dtype((logprobs, ref_logprobs))
    return logprobs.new_empty(logprobs.shape, dtype=dtype)


def _kl_setup(ctx, inputs, output):
    logprobs, ref_logprobs, estimator, max_log_ratio = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator, ctx.max_log_ratio = estimator, max_log_ratio


def _kl_backward(ctx, grad):
    # Reward shaping runs under no_grad; this formula exists so the op is a correct autograd citizen.
    logprobs, ref_logprobs = ctx.saved_tensors
    d = logprobs.to(grad.dtype) - ref_logprobs.to(grad.dtype)
    if ctx.estimator == "k1":
        dd = torch.ones_like(d)
    elif ctx.estimator == "k2":
        dd = d
    else:
        m = ctx.max_log_ratio
        dd = -torch.expm1(torch.clamp(-d, -m, m)) * ((-d >= -m) & (-d <= m)).to(d.dtype)  # expm1: no cancellation
    g = grad * dd
    return g.to(logprobs.dtype), (-g).to(ref_logprobs.dtype), None, None


torch.library.register_autograd("rlhf_ext::kl_penalty", _kl_backward, setup_context=_kl_setup)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    old_values: Optional[torch.Tensor] = None,
    returns: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    cliprange: float = 0.2,
    cliprange_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    cliprange_value: Optional[float] = 0.2,
    vf_coef: float = 0.1,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    loss_agg_norm: Optional[float] = None,
    max_log_ratio: float = 20.0,
) -> PPOLossOutput:
    """PPO/GRPO loss and statistics in one fused kernel each way (see the module docstring).

    All per-token tensors are `[B, T]` (float32/bf16/fp16/float64; mixed dtypes are upcast);
    `advantages` may also be per sequence, `[B]` or `[B, 1]` (GRPO); `mask` is bool or 0/1.
    `values` needs `old_values` and `returns`; `kl_coef != 0` needs `ref_logprobs`;
    `entropy_coef != 0` needs `entropy`; `dual_clip` is None or > 1;
    `loss_agg_norm` only goes with `loss_agg="seq-mean-token-sum-norm"`.
    """
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("loss_agg", loss_agg, LOSS_AGGS)
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        check_tensor(name, t)
    check_devices(
        "logprobs",
        logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        values=values,
        old_values=old_values,
        returns=returns,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    if values is not None and (old_values is None or returns is None):
        missing = "old_values" if old_values is None else "returns"
        raise ValueError(
            f"values: given without {missing}; the clipped value loss needs values, old_values and returns together"
        )
    if values is None and (old_values is not None or returns is not None):
        given = "old_values" if old_values is not None else "returns"
        raise ValueError(f"{given}: given without values; pass values (the critic's predictions) too, or neither")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip: expected a value > 1 (the cap on -A * ratio for A < 0) or None, got {dual_clip}")
    if loss_agg_norm is not None and loss_agg != "seq-mean-token-sum-norm":
        raise ValueError(
            f"loss_agg_norm: only used with loss_agg='seq-mean-token-sum-norm', got loss_agg={loss_agg!r}; pass None"
        )
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef: is {kl_coef} but ref_logprobs is None; the KL term needs the reference log-probs")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef: is {entropy_coef} but entropy is None; the entropy bonus needs entropy")

    if logprobs.dim() == 2 and advantages.shape in ((logprobs.shape[0],), (logprobs.shape[0], 1)):
        # GRPO's per-sequence advantages: broadcast over the tokens (a view; the kernel copies it once).
        advantages = advantages.reshape(-1, 1).expand_as(logprobs)

    def detached(t):
        return t.detach() if t is not None else None

    out = torch.ops.rlhf_ext.ppo_loss(
        logprobs,
        detached(old_logprobs),
        detached(advantages),
        as_bool_mask(mask),
        values,
        detached(old_values),
        detached(returns),
        detached(ref_logprobs),
        entropy,
        float(cliprange),
        None if cliprange_high is None else float(cliprange_high),
        None if dual_clip is None else float(dual_clip),
        None if cliprange_value is None else float(cliprange_value),
        float(vf_coef),
        float(kl_coef),
        kl_estimator,
        float(entropy_coef),
        loss_agg,
        None if loss_agg_norm is None else float(loss_agg_norm),
        float(max_log_ratio),
    )
    # One unbind instead of sixteen Python-level index ops (the wrapper's overhead is most of the
    # cost at small sizes). Only the loss keeps its graph.
    fixed = out.detach().unbind(0)
    stats = dict(zip(STAT_NAMES, fixed[5:]))
    return PPOLossOutput(out[0], fixed[1], fixed[2], fixed[3], fixed[4], stats)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *, max_log_ratio: float = 20.0
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, e.g. to shape rewards
    (`rewards - kl_coef * kl_penalty(...)`). Any shape, both the same; float32 out (float64 for
    float64 inputs). With `d = logprobs - ref_logprobs`: `k1 = d`, `k2 = d²/2`,
    `k3 = exp(-d) + d - 1` with `-d` clamped to `±max_log_ratio` (as in `ppo_loss`)."""
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    check_devices("logprobs", logprobs, ref_logprobs=ref_logprobs)
    return torch.ops.rlhf_ext.kl_penalty(logprobs, ref_logprobs, estimator, float(max_log_ratio))


# The op's scalar arguments with the wrapper's defaults, in schema order (tests/test_ppo_loss_contract.py checks
# that TENSOR_ARGS followed by these names is the schema).
SCALAR_DEFAULTS = {
    name: param.default for name, param in inspect.signature(ppo_loss).parameters.items() if name not in TENSOR_ARGS
}


def op_args(tensors: dict, **scalars) -> tuple:
    """Positional arguments of the raw `torch.ops.rlhf_ext.ppo_loss` (and of `ppo_loss_backward` after its
    `grad_out, out`), for tests and benchmarks that call the op itself: the tensors of TENSOR_ARGS looked up by
    name in `tensors` (absent ones None), then the scalars, `scalars` over the wrapper's defaults."""
    unknown = sorted(set(scalars) - set(SCALAR_DEFAULTS))
    if unknown:
        raise TypeError(f"scalars: expected names among {', '.join(SCALAR_DEFAULTS)}, got {', '.join(unknown)}")
    return tuple(tensors.get(name) for name in TENSOR_ARGS) + tuple({**SCALAR_DEFAULTS, **scalars}.values())


def bench_cases():
    """`rlhf-ext bench`: fused forward + backward against the eager composition (value, KL, entropy on)."""
    from rlhf_ext.ops.reference import ppo_loss_reference

    B, T = 64, 2048
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(B, T, generator=gen) * 3
    tensors = dict(
        old_logprobs=old,
        advantages=torch.randn(B, T, generator=gen),
        mask=torch.rand(B, T, generator=gen) > 0.1,
        old_values=torch.randn(B, T, generator=gen),
        returns=torch.randn(B, T, generator=gen),
        ref_logprobs=old + 0.1 * torch.randn(B, T, generator=gen),
    )
    leaves = dict(
        logprobs=(old + 0.1 * torch.randn(B, T, generator=gen)).requires_grad_(),
        values=(tensors["old_values"] + 0.1 * torch.randn(B, T, generator=gen)).requires_grad_(),
        entropy=torch.rand(B, T, generator=gen).requires_grad_(),
    )
    kwargs = dict(kl_coef=0.05, entropy_coef=0.01)

    def run(fn):
        def step():
            fn(**leaves, **tensors, **kwargs).loss.backward()
            for leaf in leaves.values():
                leaf.grad = None

        return step

    return [("ppo_loss fwd+bwd", f"{B}x{T}", run(ppo_loss), run(ppo_loss_reference))]
