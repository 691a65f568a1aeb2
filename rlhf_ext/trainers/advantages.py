"""Rewards into advantages, as pure tensor maths: per-token reward assembly (PPO, REINFORCE++) and the
critic-free estimators GRPO, RLOO and REINFORCE++ (with and without a group baseline), whitening over every
process's tokens (`global_masked_whiten`), and how well PPO's critic predicts the returns (`explained_variance`).
PPO's GAE is the fused `rlhf_ext.ops.gae`.

Group rewards come in the global batch layout the trainers use: completion j of prompt i sits at row
i * num_generations + j, so a group is a run of `num_generations` consecutive rows (tested against plain
Python loops in tests/test_advantages.py).
"""

import torch

from rlhf_ext.models.heads import last_token_index
from rlhf_ext.ops import gae, kl_penalty, masked_var, masked_whiten

ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
SCALE_REWARDS = ("group", "batch", "none")
# TRL's GRPO divides by std + 1e-4, so a group with equal rewards gets advantage 0, not inf.
STD_EPS = 1e-4


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-d tensor [N], got shape {list(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"num_generations: {num_generations} does not divide the {rewards.numel()} rewards of the batch"
        )
    return rewards.view(-1, num_generations)  # (N / G, G)


def group_stats(rewards: torch.Tensor, num_generations: int):
    """Per-row (group mean [N], group std [N]) with the unbiased std (torch.std), repeated over each group."""
    grouped = _grouped(rewards, num_generations)
    mean = grouped.mean(dim=1)
    std = grouped.std(dim=1) if num_generations > 1 else torch.zeros_like(mean)
    return mean.repeat_interleave(num_generations), std.repeat_interleave(num_generations)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO: `[N]` advantages (r - mean of its group), divided by the group's std (scale_rewards="group"),
    by the std of the whole batch ("batch") or not at all ("none"); std + 1e-4 as in TRL."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: expected one of {SCALE_REWARDS}, got {scale_rewards!r}")
    mean, std = group_stats(rewards, num_generations)
    centred = rewards - mean
    if scale_rewards == "group":
        return centred / (std + STD_EPS)
    if scale_rewards == "batch":
        return centred / (rewards.std() + STD_EPS)
    return centred


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO: `[N]` r_i minus the mean of the other completions of its prompt, r_i - (sum_group - r_i) / (G - 1)."""
    if num_generations < 2:
        raise ValueError(
            f"num_generations: RLOO's leave-one-out baseline needs >= 2 completions per prompt, got {num_generations}"
        )
    grouped = _grouped(rewards, num_generations)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).reshape(-1)


def token_returns(token_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, R]` undiscounted reward-to-go sum_{s >= t} r_s over the real tokens (REINFORCE++'s return),
    through the fused `gae` op with zero values and gamma = lam = 1."""
    zeros = torch.zeros_like(token_rewards)
    _, returns = gae(token_rewards, zeros, mask, gamma=1.0, lam=1.0)
    return returns * mask


def assemble_rewards(non_score_reward: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, R]` per-token rewards: non_score_reward everywhere, plus `scores[b]` on row b's last real token (its
    stop token, or the last token of a truncated completion; never a pad position)."""
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.device, rewards.dtype)
    return rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens (1: perfect critic, <= 0: useless)."""
    var_returns = float(masked_var(returns, mask, unbiased=False))
    residual = returns - values
    var_residual = float(masked_var(residual, mask, unbiased=False))
    return float("nan") if var_returns == 0 else 1.0 - var_residual / var_returns


def global_masked_whiten(x: torch.Tensor, mask: torch.Tensor, dist, shift_mean: bool = True, eps: float = 1e-8):
    """`masked_whiten` with the mean and unbiased variance taken over the real tokens of every rank (`dist`: the
    trainer's rlhf_ext.trainers.distributed.Distributed). One process: the fused op itself. Several: the moments
    are all-reduced (sum, sum of squares around a shared mean, count) and the same formula is applied:
    (x - mean) * rsqrt(var + eps), 0 where masked."""
    if not dist.enabled:
        return masked_whiten(x, mask, shift_mean=shift_mean)
    m = mask.to(torch.float64)
    xf = x.to(torch.float64)
    count, total = dist.sum(torch.stack([m.sum(), (xf * m).sum()])).unbind()
    if count < 2:
        raise ValueError(f"mask: whitening needs at least 2 real tokens over all ranks, got {int(count)}")
    mean = total / count
    var = dist.sum((((xf - mean) * m) ** 2).sum()) / (count - 1)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return (y * m).to(torch.float32 if x.dtype != torch.float64 else x.dtype)


def critic_free_advantages(args, scores, all_scores, mask, old_logprobs, ref_logprobs, row_offset: int, dist):
    """`[B, R]` advantages of this process's rows for args.advantage_estimator (see rlhf_ext.trainers.critic_free):
    scores (B,) its rewards, all_scores (N,) every process's (global row order, this process's rows from
    row_offset), mask (B, R) its response mask, old/ref log-probs (B, R) or None (no KL when beta = 0). Statistics
    over the global batch (RLOO's shaped rewards, REINFORCE++'s whitening) go through `dist`."""
    G = args.num_generations
    mine = slice(row_offset, row_offset + scores.shape[0])
    if args.advantage_estimator == "grpo":
        return group_advantages(all_scores, G, args.scale_rewards)[mine, None] * mask
    kl = kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask if args.beta > 0 else torch.zeros_like(mask)
    if args.advantage_estimator == "rloo":
        shaped = all_scores - args.beta * dist.all_gather(kl.sum(1))
        advantages = rloo_advantages(shaped, G)
        if args.normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        return advantages[mine, None] * mask
    if args.advantage_estimator == "reinforce_pp_baseline":
        scores = (all_scores - group_stats(all_scores, G)[0])[mine]
    returns = token_returns(assemble_rewards(-args.beta * kl, scores, mask), mask)
    return global_masked_whiten(returns, mask, dist)


def ppo_targets(args, kl_coef, dist, old_logprobs, ref_logprobs, values, scores, mask, step_rewards=None) -> dict:
    """The Experience fields PPO's update trains towards, over the (B, R) tokens `mask` marks: the per-token reward
    (-kl_coef * KL(old || ref) on every token, plus `step_rewards` (B, R) where given, plus `scores` (B,) on each
    row's last token; whitened with args.whiten_rewards), GAE advantages (args.gamma, args.lam; whitened over every
    process through `dist`) and returns, with the log-probs and values they came from."""
    kl = kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask  # (B, R)
    non_score = -kl_coef * kl if step_rewards is None else -kl_coef * kl + step_rewards
    rewards = assemble_rewards(non_score, scores, mask)
    if args.whiten_rewards:
        rewards = global_masked_whiten(rewards, mask, dist, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma=args.gamma, lam=args.lam)
    advantages = global_masked_whiten(advantages, mask, dist)
    fields = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values, kl=kl, rewards=rewards)
    return {**fields, "advantages": advantages, "returns": returns}
