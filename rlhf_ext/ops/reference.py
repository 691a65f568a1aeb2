"""Plain-PyTorch twins of every rlhf_ext op: the test oracle and the benchmark baseline.

These are written the way RLHF frameworks write them today (Python loops over time, full
log-softmax, composed elementwise losses), for clarity, not speed. Never import them on a hot path.
"""
from typing import Optional, Tuple

import torch

# ---- gae / whiten (issue 2) ----


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Python reverse loop over time that TRL/veRL/OpenRLHF use, extended to skip masked
    positions (the next value and running advantage carry across them; outputs there are 0)."""
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r, v = rewards.to(out_dtype), values.to(out_dtype)
    m = mask.bool() if mask.dtype != torch.bool else mask
    B, T = r.shape
    next_value = last_values.to(out_dtype) if last_values is not None else r.new_zeros(B)
    running = r.new_zeros(B)
    advantages = torch.zeros_like(r)
    for t in reversed(range(T)):
        valid = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        new_running = delta + gamma * lam * running
        running = torch.where(valid, new_running, running)
        next_value = torch.where(valid, v[:, t], next_value)
        advantages[:, t] = torch.where(valid, running, torch.zeros_like(running))
    returns = torch.where(m, advantages + v, torch.zeros_like(v))
    return advantages, returns


def masked_mean_reference(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    m = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    xf = x.to(m.dtype)
    if dim is None:
        return (xf * m).sum() / m.sum()
    return (xf * m).sum(dim) / m.sum(dim)


def masked_var_reference(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    m = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    xf = x.to(m.dtype)
    mean = masked_mean_reference(xf, mask)
    var = (((xf - mean) * m) ** 2).sum()
    n = m.sum()
    return var / (n - 1) if unbiased else var / n


def masked_whiten_reference(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True
) -> torch.Tensor:
    m = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    xf = x.to(m.dtype)
    mean = masked_mean_reference(xf, mask)
    var = masked_var_reference(xf, mask, unbiased)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return y * m


# ---- logprobs (issue 3) ----


# ---- ppo_loss (issue 4) ----


# ---- sampling (issue 5) ----
