"""csrc/cuda/whiten.cuh on the GPU simulator (tests/sim_harness.py): the moments partial kernel (one block per
16384-element segment) and the combine kernel, and the whiten kernel, against a float64 oracle, the reference
(reference.masked_whiten_reference) and the CPU kernels, for every dtype."""

import numpy as np
import pytest
import torch

from rlhf_ext.ops.reference import masked_whiten_reference

pytestmark = pytest.mark.cuda_sim

SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
SEGMENT = 16384
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def sim_moments(cuda_sim, x, mask):
    """-> (moments [3] (count, mean, M2) in the statistics type, partials [segments, 3] float64)."""
    lib = cuda_sim.library("whiten")
    segments = lib.call("sim_moments_num_segments", x.numel(), check=False)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = torch.full((segments, 3), float("nan"), dtype=torch.float64)
    out = torch.full((3,), float("nan"), dtype=stat)
    lib.call(f"sim_masked_moments_{SUFFIX[x.dtype]}", x.contiguous(), mask.contiguous(), x.numel(), partials, out)
    return out, partials


def sim_whiten(cuda_sim, x, mask, moments, shift_mean=True, unbiased=True, eps=1e-8):
    out = torch.full(x.shape, float("nan"), dtype=moments.dtype)
    cuda_sim.library("whiten").call(
        f"sim_masked_whiten_{SUFFIX[x.dtype]}",
        x.contiguous(),
        mask.contiguous(),
        moments,
        x.numel(),
        int(shift_mean),
        int(unbiased),
        float(eps),
        out,
    )
    return out


def _oracle(x, mask):
    """(count, mean, M2) in float64 over the masked elements."""
    v = x.double()[mask].numpy()
    return np.array([v.size, v.mean() if v.size else 0.0, ((v - v.mean()) ** 2).sum() if v.size else 0.0])


def _case(numel, dtype, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (loc + scale * torch.randn(numel, generator=g)).to(dtype)
    mask = torch.rand(numel, generator=g) > 0.3
    if numel > 2 * SEGMENT:
        mask[SEGMENT : 2 * SEGMENT] = False  # a segment without a valid element (skipped by the combine)
    return x, mask


def _assert_moments(moments, expected, dtype):
    rtol = 1e-12 if dtype == torch.float64 else 2e-6  # double accumulation, rounded to the statistics type
    np.testing.assert_allclose(moments.double().numpy(), expected, rtol=rtol, atol=1e-9 * max(1.0, expected[2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_partials_and_combine(cuda_sim, dtype):
    x, mask = _case(2 * SEGMENT + SEGMENT // 2 + 7, dtype, seed=1)  # 3 segments, the last one partial
    moments, partials = sim_moments(cuda_sim, x, mask)
    assert partials.shape == (3, 3)
    for s in range(3):
        part = slice(s * SEGMENT, (s + 1) * SEGMENT)
        np.testing.assert_allclose(partials[s].numpy(), _oracle(x[part], mask[part]), rtol=1e-10, atol=1e-9)
    _assert_moments(moments, _oracle(x, mask), dtype)
    cpu = torch.ops.rlhf_ext.masked_moments(x, mask)
    torch.testing.assert_close(moments, cpu, rtol=2e-6, atol=1e-6)


def test_moments_large_offset_and_nonfinite_outside_mask(cuda_sim):
    """Values around 1e4 with unit spread keep their variance (two passes, double sums); inf/NaN at masked
    positions are never read."""
    x, mask = _case(SEGMENT + 999, torch.float32, seed=2, loc=1e4)
    x[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(int((~mask).sum()) // 3 + 1)[
        : int((~mask).sum())
    ]
    moments, _ = sim_moments(cuda_sim, x, mask)
    _assert_moments(moments, _oracle(x, mask), torch.float32)
    assert abs(moments[2].item() / mask.sum().item() - 1.0) < 0.05  # the unit variance survived


def test_moments_of_an_empty_mask_and_no_elements(cuda_sim):
    x = torch.randn(1000)
    moments, partials = sim_moments(cuda_sim, x, torch.zeros(1000, dtype=torch.bool))
    assert moments.tolist() == [0.0, 0.0, 0.0] and partials.shape == (1, 3)
    moments, _ = sim_moments(cuda_sim, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert moments.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift_mean, unbiased", [(True, True), (False, False)])
def test_whiten_matches_reference_and_cpu(cuda_sim, dtype, shift_mean, unbiased):
    x, mask = _case(3000, dtype, seed=3, loc=2.0, scale=3.0)
    moments, _ = sim_moments(cuda_sim, x, mask)
    out = sim_whiten(cuda_sim, x, mask, moments, shift_mean, unbiased)
    ref = masked_whiten_reference(x.double(), mask, shift_mean=shift_mean, unbiased=unbiased)
    cpu = torch.ops.rlhf_ext.masked_whiten(x, mask, shift_mean, unbiased, 1e-8)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert out.dtype == cpu.dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(out, cpu, rtol=2 * tol, atol=2 * tol)
    assert torch.all(out[~mask] == 0)


def test_whiten_outside_the_mask_is_exactly_zero_whatever_is_there(cuda_sim):
    """The contract: 0 outside the mask even where x is inf/NaN, and the statistics ignore those positions."""
    x, mask = _case(SEGMENT + 5000, torch.float32, seed=4, scale=1e4)  # ±1e4 values
    clean = torch.where(mask, x, torch.zeros(()))
    x[~mask] = float("nan")
    x[torch.nonzero(~mask)[::2, 0]] = float("inf")
    moments, _ = sim_moments(cuda_sim, x, mask)
    out = sim_whiten(cuda_sim, x, mask, moments)
    assert torch.all(out[~mask] == 0) and torch.isfinite(out).all()
    ref = masked_whiten_reference(clean.double(), mask)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)
