"""Critic-free advantage estimators against plain Python loops."""

import math
import statistics

import pytest
import torch

from rlhf_ext.ops.reference import masked_whiten_reference
from rlhf_ext.trainers.advantages import (
    global_masked_whiten,
    group_advantages,
    group_stats,
    rloo_advantages,
    token_returns,
)


def reference_group_advantages(rewards, G, scale):
    """TRL's formula, element by element: (r - group mean) / (std + 1e-4), std unbiased."""
    out = []
    batch_std = statistics.stdev(rewards)
    for start in range(0, len(rewards), G):
        group = rewards[start : start + G]
        mean = sum(group) / G
        std = statistics.stdev(group)
        for r in group:
            if scale == "group":
                out.append((r - mean) / (std + 1e-4))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + 1e-4))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_advantages_match_reference(scale, G):
    g = torch.Generator().manual_seed(G)
    rewards = torch.randn(5 * G, generator=g, dtype=torch.float64) * 3 + 1
    rewards[:G] = 0.5  # a group where every completion got the same reward: advantage 0, never inf/nan
    got = group_advantages(rewards, G, scale)
    expected = torch.tensor(reference_group_advantages(rewards.tolist(), G, scale), dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert torch.all(got[:G] == 0)


def test_group_stats_repeat_per_row():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])
    mean, std = group_stats(rewards, 2)
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, 0.0, 0.0, 3.0, 3.0]))
    torch.testing.assert_close(std, torch.tensor([math.sqrt(2)] * 2 + [0.0] * 2 + [math.sqrt(2)] * 2))


@pytest.mark.parametrize("G", [2, 4, 5])
def test_rloo_advantages_match_leave_one_out(G):
    rewards = torch.randn(3 * G, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = []
    values = rewards.tolist()
    for i, r in enumerate(values):
        start = i - i % G
        others = [values[j] for j in range(start, start + G) if j != i]
        expected.append(r - sum(others) / len(others))
    torch.testing.assert_close(rloo_advantages(rewards, G), torch.tensor(expected, dtype=torch.float64))


def test_token_returns_are_reward_to_go_over_real_tokens():
    rewards = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    got = token_returns(rewards * mask, mask)
    expected = torch.zeros_like(rewards)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            expected[b, t] = sum(float(rewards[b, s]) for s in range(t, n))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_global_whiten_single_process_is_masked_whiten():
    class OneProcess:
        enabled = False

    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))
    mask = (torch.rand(4, 7, generator=torch.Generator().manual_seed(3)) > 0.3).float()
    torch.testing.assert_close(global_masked_whiten(x, mask, OneProcess()), masked_whiten_reference(x, mask))


def test_bad_group_sizes_are_named():
    with pytest.raises(ValueError, match="num_generations: 3 does not divide the 8 rewards"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(8), 2, "groups")
    with pytest.raises(ValueError, match=">= 2 completions"):
        rloo_advantages(torch.zeros(8), 1)
