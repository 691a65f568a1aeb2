"""PPO loss forward + backward: the fused kernels against the eager composition frameworks write
(value, KL and entropy terms on, statistics computed too). `eager_item` adds the `.item()` calls that
frameworks make to log the statistics (a host sync each on GPU); `eager` leaves them on the device."""

import pytest
import torch

from benchmarks.conftest import sizes, sync
from rlhf_ext.ops import ppo_loss
from rlhf_ext.ops.reference import ppo_loss_reference

SHAPES = sizes([(64, 512), (64, 2048)], [(4, 16)])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COEFS = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, kl_coef=0.05, entropy_coef=0.01)


def eager_ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    values,
    old_values,
    returns,
    ref_logprobs,
    entropy,
    cliprange,
    cliprange_value,
    vf_coef,
    kl_coef,
    entropy_coef,
):
    """The loss as TRL / OpenRLHF write it: float mask products, masked means, k3 KL, then stats."""
    m = mask.float()
    n = m.sum()

    def masked_mean(x):
        return (x * m).sum() / n

    log_ratio = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(pg_losses1, pg_losses2))
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2))
    ref_log_ratio = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    kl = masked_mean(torch.exp(ref_log_ratio) - ref_log_ratio - 1)
    mean_entropy = masked_mean(entropy)
    loss = policy_loss + vf_coef * value_loss + kl_coef * kl - entropy_coef * mean_entropy
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "kl": kl,
            "entropy": mean_entropy,
            "clipfrac": masked_mean((pg_losses2 > pg_losses1).float()),
            "approxkl": masked_mean(0.5 * log_ratio**2),
            "approxkl_k3": masked_mean((ratio - 1) - log_ratio),
            "ratio_mean": masked_mean(ratio),
            "ratio_max": torch.where(mask, ratio, 0.0).max(),
            "value_clipfrac": masked_mean((vf_losses2 > vf_losses1).float()),
        }
    return loss, stats


def _inputs(B, T, device):
    g = torch.Generator().manual_seed(0)
    old = -3 * torch.rand(B, T, generator=g)
    old_values = torch.randn(B, T, generator=g)
    tensors = {
        "logprobs": old + 0.2 * torch.randn(B, T, generator=g),
        "old_logprobs": old,
        "advantages": torch.randn(B, T, generator=g),
        "mask": torch.rand(B, T, generator=g) > 0.1,
        "values": old_values + 0.1 * torch.randn(B, T, generator=g),
        "old_values": old_values,
        "returns": torch.randn(B, T, generator=g),
        "ref_logprobs": old + 0.1 * torch.randn(B, T, generator=g),
        "entropy": 3 * torch.rand(B, T, generator=g),
    }
    tensors = {k: v.to(device) for k, v in tensors.items()}
    for k in ("logprobs", "values", "entropy"):
        tensors[k].requires_grad_()
    return tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("impl", ["fused", "eager_item", "eager", "reference"])
def test_ppo_loss_fwd_bwd(benchmark, impl, B, T, device):
    x = _inputs(B, T, device)
    leaves = [x["logprobs"], x["values"], x["entropy"]]

    def fused():
        out = ppo_loss(**x, **COEFS)
        out.loss.backward()
        return out.stats

    def reference():
        out = ppo_loss_reference(**x, **COEFS)
        out.loss.backward()
        return out.stats

    def eager(with_item):
        loss, stats = eager_ppo_loss(**x, **COEFS)
        loss.backward()
        return {k: v.item() for k, v in stats.items()} if with_item else stats

    fn = {"fused": fused, "reference": reference, "eager": lambda: eager(False), "eager_item": lambda: eager(True)}[
        impl
    ]
    benchmark.group = f"ppo_loss fwd+bwd {device} B={B} T={T}"
    benchmark.extra_info["role"] = impl

    def run():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        sync(device)
        return out

    benchmark(run)
