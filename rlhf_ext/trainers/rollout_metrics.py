"""What the trainers log about one batch of completions (TRL's metric names): PPO's rewards, KL and value fit
(`ppo_rollout_metrics`) and the critic-free trainers' group statistics and lengths (`group_rollout_metrics`).
The trainers' update metrics stay in their update loops."""

import torch

from rlhf_ext.trainers.advantages import explained_variance, group_stats


def ppo_rollout_metrics(exp, kl_coef: float, reward_sources) -> dict:
    """This process's means over a PPO Experience; `kl_coef` is the one its rewards were assembled with."""
    mean_kl = float(exp.kl.sum(1).mean())
    non_score = float((-kl_coef * exp.kl).sum(1).mean())  # the KL part of the rewards
    scores = float(exp.scores.mean())
    mask = exp.response_mask if exp.agent_mask is None else exp.agent_mask  # (B, R): the agent's tokens
    metrics = {
        "objective/kl": mean_kl,
        "objective/entropy": float((-exp.old_logprobs * mask).sum(1).mean()),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": scores + non_score,
        "objective/scores": scores,
        "val/num_eos_tokens": float(exp.finished.sum()),
        "val/vf_explained_var": explained_variance(exp.values, exp.returns, mask),
        "completions/mean_length": float(mask.sum(1).mean()),
    }
    if len(reward_sources) > 1:
        for i, name in enumerate(reward_sources.names):
            metrics[f"rewards/{name}/mean"] = float(torch.nanmean(exp.per_source[:, i]))
    return metrics


def group_rollout_metrics(scores, per_source, lengths, finished, num_generations: int, source_names) -> dict:
    """Over the completions of every process, in global row order: scores (N,), per_source (N, S) with NaN where
    a source gave None, lengths (N,) response tokens, finished (N,) bool; groups of `num_generations` rows."""
    group_std = group_stats(scores, num_generations)[1]
    metrics = {
        "reward": float(scores.mean()),
        "reward_std": float(group_std.mean()),
        "frac_reward_zero_std": float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean()),
    }
    for i, name in enumerate(source_names):
        column = per_source[:, i]
        present = column[~torch.isnan(column)]
        metrics[f"rewards/{name}/mean"] = float(present.mean()) if present.numel() else float("nan")
        metrics[f"rewards/{name}/std"] = float(present.std()) if present.numel() > 1 else float("nan")
    lengths = lengths.float()
    done = lengths[finished]
    metrics.update(
        {
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float((~finished).float().mean()),
            "completions/mean_terminated_length": float(done.mean()) if done.numel() else 0.0,
            "completions/min_terminated_length": float(done.min()) if done.numel() else 0.0,
            "completions/max_terminated_length": float(done.max()) if done.numel() else 0.0,
        }
    )
    return metrics
