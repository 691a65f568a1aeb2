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


def _ppo_dtype(*tensors) -> torch.dtype:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def kl_penalty_reference(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *, max_log_ratio: float = 20.0
) -> torch.Tensor:
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (with -d clamped), d = logprobs - ref_logprobs."""
    dt = _ppo_dtype(logprobs, ref_logprobs)
    lp, ref = logprobs.to(dt), ref_logprobs.to(dt)
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    if estimator == "k3":
        e = torch.clamp(ref - lp, -max_log_ratio, max_log_ratio)
        return torch.exp(e) - e - 1
    raise ValueError(f"estimator: expected one of 'k1', 'k2', 'k3', got {estimator!r}")


def ppo_loss_reference(
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
):
    """The elementwise composition TRL / veRL / OpenRLHF write, with the semantics of
    `rlhf_ext.ops.ppo_loss` (same signature and output; autograd gives the gradients)."""
    from rlhf_ext.ops.ppo_loss import PPOLossOutput

    dt = _ppo_dtype(logprobs, old_logprobs, advantages, values, old_values, returns, ref_logprobs, entropy)
    m = mask.bool() if mask.dtype != torch.bool else mask
    mf = m.to(dt)
    n_tokens = mf.sum()
    row_tokens = mf.sum(-1)
    n_seqs = (row_tokens > 0).to(dt).sum()

    def agg(x):  # (B, T) -> 0-dim, masked positions selected away
        x = torch.where(m, x, torch.zeros_like(x))
        if loss_agg == "token-mean":
            return x.sum() / n_tokens.clamp(min=1)
        if loss_agg == "seq-mean-token-mean":
            per_row = x.sum(-1) / row_tokens.clamp(min=1)
        elif loss_agg == "seq-mean-token-sum":
            per_row = x.sum(-1)
        elif loss_agg == "seq-mean-token-sum-norm":
            per_row = x.sum(-1) / (loss_agg_norm if loss_agg_norm is not None else m.shape[-1])
        else:
            raise ValueError(f"loss_agg: unknown {loss_agg!r}")
        return per_row.sum() / n_seqs.clamp(min=1)

    def token_mean(x):
        return torch.where(m, x.to(dt), torch.zeros((), dtype=dt)).sum() / n_tokens.clamp(min=1)

    lp, old, adv = logprobs.to(dt), old_logprobs.to(dt), advantages.to(dt)
    log_ratio = torch.clamp(lp - old, -max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    low, high = 1 - cliprange, 1 + (cliprange if cliprange_high is None else cliprange_high)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, low, high)
    pg = torch.maximum(pg1, pg2)
    zero = torch.zeros((), dtype=dt)
    dual_capped = torch.zeros_like(m)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_capped = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg3, pg), pg)
    clipped = pg2 > pg1
    policy_loss = agg(pg)

    value_loss, value_clipped = zero, torch.zeros_like(m)
    if values is not None:
        v, v_old, ret = values.to(dt), old_values.to(dt), returns.to(dt)
        if cliprange_value is None:
            vf = 0.5 * (v - ret) ** 2
        else:
            vf1 = (v - ret) ** 2
            vf2 = (torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value) - ret) ** 2
            vf = 0.5 * torch.maximum(vf1, vf2)
            value_clipped = vf2 > vf1
        value_loss = agg(vf)

    kl = agg(kl_penalty_reference(lp, ref_logprobs, kl_estimator, max_log_ratio=max_log_ratio)) \
        if ref_logprobs is not None else zero
    ent = agg(entropy.to(dt)) if entropy is not None else zero
    loss = policy_loss + vf_coef * value_loss + kl_coef * kl - entropy_coef * ent

    with torch.no_grad():
        stats = {
            "clipfrac": token_mean(clipped),
            "clipfrac_low": token_mean(clipped & (ratio < low)),
            "clipfrac_high": token_mean(clipped & (ratio > high)),
            "dual_clipfrac": token_mean(dual_capped),
            "approxkl": token_mean(0.5 * log_ratio ** 2),
            "approxkl_k3": token_mean((ratio - 1) - log_ratio),
            "ratio_mean": token_mean(ratio),
            "ratio_max": torch.where(m, ratio, zero).max() if m.numel() else zero,
            "value_clipfrac": token_mean(value_clipped),
            "num_tokens": n_tokens,
            "num_seqs": n_seqs,
        }
    return PPOLossOutput(loss, policy_loss.detach(), value_loss.detach(), kl.detach(), ent.detach(),
                         {k: v.detach() for k, v in stats.items()})


# ---- sampling (issue 5) ----
