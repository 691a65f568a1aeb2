"""GAE: the fused kernel against the Python reverse loop over time that TRL/veRL/OpenRLHF use."""

import pytest
import torch

from benchmarks.conftest import sizes, synced
from rlhf_ext.ops import gae
from rlhf_ext.ops.reference import gae_reference

SHAPES = sizes([(64, 256), (64, 1024), (64, 4096)], [(4, 16)])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def python_loop_gae(rewards, values, mask, gamma, lam):
    """The loop as frameworks write it today: no mask handling inside, one Python step per token."""
    T = rewards.shape[1]
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages * mask, (advantages + values) * mask


def _inputs(B, T, device):
    rewards = torch.randn(B, T, device=device)
    values = torch.randn(B, T, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return rewards, values, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("impl", ["fused", "python_loop", "reference_masked_loop"])
def test_gae(benchmark, impl, B, T, device):
    rewards, values, mask = _inputs(B, T, device)
    fn = {
        "fused": lambda: gae(rewards, values, mask, 0.99, 0.95),
        "python_loop": lambda: python_loop_gae(rewards, values, mask.float(), 0.99, 0.95),
        "reference_masked_loop": lambda: gae_reference(rewards, values, mask, 0.99, 0.95),
    }[impl]
    benchmark.group = f"gae {device} B={B} T={T}"
    benchmark.extra_info["role"] = impl
    benchmark(synced(fn, device))
