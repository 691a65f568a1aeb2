"""Generalised Advantage Estimation in one kernel (no Python loop over time)."""

from typing import Optional

import torch

from rlhf_ext.ops._common import as_bool_mask, check_devices, out_float_dtype


@torch.library.register_fake("rlhf_ext::gae")
def _gae_fake(rewards, values, mask, gamma, lam, last_values):
    out_dtype = out_float_dtype(rewards.dtype)
    return rewards.new_empty(rewards.shape, dtype=out_dtype), rewards.new_empty(rewards.shape, dtype=out_dtype)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both `[B, T]` float32 (float64 for float64 input).

    rewards, values: `[B, T]` float32/bf16/fp16. mask: `[B, T]` bool or 0/1.
    Masked positions are skipped: the next value and the running advantage carry across them
    unchanged, and both outputs are 0 there (multi-turn safe: tool/observation tokens in the
    middle of a response do not break the recursion). The value after a row's last valid token
    is `last_values[b]` (bootstrap for truncated rollouts) or 0. `returns = advantages + values`.
    The outputs are targets and carry no gradient.
    """
    if not isinstance(gamma, (int, float)) or not isinstance(lam, (int, float)):
        raise TypeError(f"gamma and lam: expected Python floats, got {type(gamma).__name__} and {type(lam).__name__}")
    check_devices("rewards", rewards, values=values, mask=mask, last_values=last_values)
    if last_values is not None:
        last_values = last_values.detach()
    return torch.ops.rlhf_ext.gae(
        rewards.detach(), values.detach(), as_bool_mask(mask), float(gamma), float(lam), last_values
    )


def bench_cases():
    """Shapes for `rlhf-ext bench`: the fused kernel against the Python reverse loop."""
    from rlhf_ext.ops.reference import gae_reference

    B, T = 64, 1024
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    return [
        (
            "gae fwd",
            f"{B}x{T}",
            lambda: gae(rewards, values, mask, 0.99, 0.95),
            lambda: gae_reference(rewards, values, mask, 0.99, 0.95),
        )
    ]
