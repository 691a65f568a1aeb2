"""csrc/cuda/gae.cuh's launch_gae run on the GPU simulator (tests/sim_harness.py), against the float64 oracle
(reference.gae_reference) and the CPU kernel: every dtype, rows longer than one 1024-step scan chunk, holes,
empty and right-padded rows, a bootstrap value, ±1e4 and non-finite inputs."""

import math

import pytest
import torch

from rlhf_ext.ops import gae
from rlhf_ext.ops.reference import gae_reference

pytestmark = pytest.mark.cuda_sim

SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def sim_gae(cuda_sim, rewards, values, mask, gamma, lam, last_values=None):
    """launch_gae on the simulator -> (advantages, returns); outputs start as NaN so an unwritten entry shows."""
    B, T = rewards.shape
    acc = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    adv = torch.full((B, T), float("nan"), dtype=acc)
    ret = torch.full((B, T), float("nan"), dtype=acc)
    last = last_values.to(acc).contiguous() if last_values is not None else None
    cuda_sim.library("gae").call(
        f"sim_gae_{SUFFIX[rewards.dtype]}",
        rewards.contiguous(),
        values.contiguous(),
        mask.contiguous(),
        last,
        adv,
        ret,
        B,
        T,
        float(gamma),
        float(lam),
    )
    return adv, ret


def _inputs(B, T, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.randn(B, T, generator=g) * scale).to(dtype)
    values = (torch.randn(B, T, generator=g) * scale).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.2  # random holes
    mask[:, 5:9] = False  # a run of holes
    if B > 2:
        mask[1] = False  # no valid token
        mask[2, T // 2 :] = False  # right padding
    return rewards, values, mask


def _check(adv, ret, rewards, values, mask, gamma, lam, last_values=None):
    ref_adv, ref_ret = gae_reference(
        rewards.double(), values.double(), mask, gamma, lam, last_values.double() if last_values is not None else None
    )
    cpu_adv, cpu_ret = gae(rewards, values, mask, gamma, lam, last_values)
    assert adv.dtype == cpu_adv.dtype
    if adv.dtype == torch.float64:
        atol = 1e-11 * (ref_adv.abs().max().item() + ref_ret.abs().max().item() + 1)
    else:  # float32 accumulation over up to T terms: a few ulps of the largest partial sum (as test_gae.py)
        scale = ref_adv.abs().max().item() + ref_ret.abs().max().item() + 1.0
        atol = 8 * torch.finfo(torch.float32).eps * scale * math.sqrt(rewards.shape[1])
    torch.testing.assert_close(adv.double(), ref_adv, rtol=0, atol=atol)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=0, atol=atol)
    torch.testing.assert_close(adv, cpu_adv, rtol=0, atol=2 * atol)
    torch.testing.assert_close(ret, cpu_ret, rtol=0, atol=2 * atol)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_gae_every_dtype(cuda_sim, dtype):
    rewards, values, mask = _inputs(4, 37, dtype, seed=1)
    last = torch.randn(4, generator=torch.Generator().manual_seed(2))
    adv, ret = sim_gae(cuda_sim, rewards, values, mask, 0.99, 0.95, last)
    _check(adv, ret, rewards, values, mask, 0.99, 0.95, last)


@pytest.mark.parametrize(
    "B, T, gamma, lam",
    [
        (2, 2500, 0.99, 0.95),  # three 1024-step chunks
        (3, 1024, 1.0, 1.0),  # exactly one chunk, no discount
        (1, 1, 0.9, 0.8),
    ],
)
def test_gae_shapes_and_chunks(cuda_sim, B, T, gamma, lam):
    rewards, values, mask = _inputs(B, T, torch.float32, seed=B * T)
    if T > 1024:
        mask[0, 1020:1030] = False  # holes across the chunk boundary
    adv, ret = sim_gae(cuda_sim, rewards, values, mask, gamma, lam)
    _check(adv, ret, rewards, values, mask, gamma, lam)


def test_gae_large_values_and_nonfinite_in_holes(cuda_sim):
    """±1e4 rewards/values are carried exactly as on CPU; inf/NaN at masked positions are never read."""
    rewards, values, mask = _inputs(3, 300, torch.float32, seed=5, scale=1e4)
    rewards[0, ~mask[0]] = float("nan")
    values[0, ~mask[0]] = float("inf")
    values[2, -1] = float("-inf")  # right padding of row 2
    adv, ret = sim_gae(cuda_sim, rewards, values, mask, 0.99, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    _check(adv, ret, rewards, values, mask, 0.99, 0.95)


def test_gae_nan_at_valid_position_propagates_like_cpu(cuda_sim):
    """A NaN reward at a valid token poisons that token and every earlier one of its row, as on CPU."""
    rewards, values, mask = _inputs(3, 50, torch.float32, seed=7)
    mask[0] = True
    rewards[0, 30] = float("nan")
    adv, ret = sim_gae(cuda_sim, rewards, values, mask, 0.99, 0.95)
    cpu_adv, cpu_ret = gae(rewards, values, mask, 0.99, 0.95)
    assert torch.equal(torch.isnan(adv), torch.isnan(cpu_adv)) and torch.isnan(adv[0, :31]).all()
    assert torch.isfinite(adv[0, 31:]).all() and torch.isfinite(adv[2]).all()
    torch.testing.assert_close(adv, cpu_adv, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(ret, cpu_ret, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_gae_empty_batch_launches_nothing(cuda_sim):
    rewards = torch.zeros(0, 5)
    adv, ret = sim_gae(cuda_sim, rewards, rewards, torch.zeros(0, 5, dtype=torch.bool), 0.99, 0.95)
    assert adv.shape == (0, 5)
