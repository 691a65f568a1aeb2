"""Masked whitening: the fused two-kernel path against the composed masked mean / var / whiten."""

import pytest
import torch

from benchmarks.conftest import sizes, synced
from rlhf_ext.ops import masked_whiten
from rlhf_ext.ops.reference import masked_whiten_reference

SHAPES = sizes([(64, 256), (64, 1024), (64, 4096)], [(4, 16)])
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def eager_whiten(values, mask, shift_mean=True):
    """How TRL-style code writes it: masked mean, masked var with Bessel correction, then whiten."""
    mask = mask.float()
    mean = (values * mask).sum() / mask.sum()
    centered = values - mean
    variance = (centered.pow(2) * mask).sum() / mask.sum()
    variance = variance * mask.sum() / (mask.sum() - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, T", SHAPES)
@pytest.mark.parametrize("impl", ["fused", "eager", "reference"])
def test_whiten(benchmark, impl, B, T, device):
    x = torch.randn(B, T, device=device)
    mask = torch.rand(B, T, device=device) > 0.2
    fn = {
        "fused": lambda: masked_whiten(x, mask),
        "eager": lambda: eager_whiten(x, mask),
        "reference": lambda: masked_whiten_reference(x, mask),
    }[impl]
    benchmark.group = f"masked_whiten {device} B={B} T={T}"
    benchmark.extra_info["role"] = impl
    benchmark(synced(fn, device))
