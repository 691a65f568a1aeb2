"""GAE: the fused kernel against the Python reverse loop (float64 oracle)."""

import math

import pytest
import torch

from rlhf_ext.ops import gae
from rlhf_ext.ops.reference import gae_reference


def _inputs(B, T, dtype=torch.float32, hole_p=0.2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g).to(dtype)
    values = torch.randn(B, T, generator=g).to(dtype)
    mask = torch.rand(B, T, generator=g) > hole_p
    if B > 2:
        mask[1] = False  # a row with no valid token
        mask[2, T // 2 :] = False  # a right-padded row
    return rewards.to(device), values.to(device), mask.to(device)


def _check(B, T, gamma, lam, dtype, device="cpu", last_values=False):
    rewards, values, mask = _inputs(B, T, dtype, device=device)
    lv = torch.randn(B, device=device) if last_values else None
    adv, ret = gae(rewards, values, mask, gamma, lam, lv)
    ref_adv, ref_ret = gae_reference(
        rewards.double(), values.double(), mask, gamma, lam, lv.double() if lv is not None else None
    )
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    # float32 accumulation over at most T terms of size O(1/(1-gamma*lam)): bound the absolute error
    # by a few ulps of the largest partial sum.
    scale = ref_adv.abs().max().item() + ref_ret.abs().max().item() + 1.0
    atol = 8 * torch.finfo(torch.float32).eps * scale * math.sqrt(T)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=0, atol=atol)
    torch.testing.assert_close(ret.double(), ref_ret, rtol=0, atol=atol)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


@pytest.mark.parametrize("B", [1, 3, 64])
@pytest.mark.parametrize("T", [1, 7, 1024, 4096])
def test_gae_matches_reference_shapes(B, T):
    _check(B, T, 0.99, 0.95, torch.float32)


@pytest.mark.parametrize("gamma", [1.0, 0.99, 0.95])
@pytest.mark.parametrize("lam", [1.0, 0.99, 0.95])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gae_matches_reference_gamma_lam_dtypes(gamma, lam, dtype):
    _check(3, 257, gamma, lam, dtype)


def test_gae_float64_exact():
    rewards, values, mask = _inputs(5, 33, torch.float64)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, 0.9, 0.8)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, ref_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-12, atol=1e-12)


def test_gae_last_values_bootstrap():
    _check(4, 50, 0.99, 0.95, torch.float32, last_values=True)


def test_gae_hand_computed():
    # One row: r = [1, 0, 2], v = [0.5, 0.25, 1], the middle position masked (multi-turn gap).
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    mask = torch.tensor([[True, False, True]])
    gamma, lam = 0.9, 0.8
    a2 = 2.0 + gamma * 0.0 - 1.0  # last valid token: next value 0
    a0 = (1.0 + gamma * 1.0 - 0.5) + gamma * lam * a2  # skips the masked position
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 1.0]]))


def test_gae_long_sequence_stays_finite():
    rewards, values, mask = _inputs(2, 8192, torch.float32)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    _check(2, 8192, 1.0, 1.0, torch.float32)


def test_gae_mask_dtypes_equivalent():
    rewards, values, mask = _inputs(3, 20)
    expected = gae(rewards, values, mask, 0.99, 0.95)
    for other in (mask.float(), mask.long(), mask.to(torch.uint8)):
        got = gae(rewards, values, other, 0.99, 0.95)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_gae_metamorphic_masked_positions_do_not_matter():
    rewards, values, mask = _inputs(6, 100)
    expected = gae(rewards, values, mask, 0.99, 0.95)
    noise_r = torch.where(mask, rewards, torch.randn_like(rewards) * 1e3)
    noise_v = torch.where(mask, values, torch.randn_like(values) * 1e3)
    got = gae(noise_r, noise_v, mask, 0.99, 0.95)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_gae_thread_count_does_not_change_result():
    rewards, values, mask = _inputs(64, 300)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gae(rewards, values, mask, 0.99, 0.95)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(gae(rewards, values, mask, 0.99, 0.95), one, rtol=0, atol=0)


def test_gae_opcheck():
    rewards, values, mask = _inputs(3, 17)
    torch.library.opcheck(torch.ops.rlhf_ext.gae, (rewards, values, mask, 0.99, 0.95, None))
    torch.library.opcheck(torch.ops.rlhf_ext.gae, (rewards, values, mask, 1.0, 1.0, torch.randn(3)))


def test_gae_torch_compile_fullgraph():
    def advantages_fn(rewards, values, mask):
        adv, ret = gae(rewards, values, mask, 0.99, 0.95)
        return adv * 2.0, ret

    rewards, values, mask = _inputs(4, 31)
    compiled = torch.compile(advantages_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rewards, values, mask), advantages_fn(rewards, values, mask))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=torch.randn(2, 5), values=torch.randn(2, 6)), "values: expected shape \\[2, 5\\]"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask: expected shape \\[2, 5\\]"),
        (dict(gamma=float("nan")), "gamma: expected a finite value"),
        (dict(lam=1.5), "lam: expected a finite value in \\[0, 1\\]"),
        (dict(rewards=torch.ones(2, 5, dtype=torch.int64)), "rewards: expected a float32/bfloat16/float16"),
        (dict(rewards=torch.randn(5)), "rewards: expected a 2-d tensor"),
        (dict(values=torch.randn(2, 5).double()), "values: expected dtype Float"),
        (dict(last_values=torch.randn(3)), "last_values: expected shape \\[2\\]"),
    ],
)
def test_gae_bad_inputs(kwargs, match):
    args = dict(
        rewards=torch.randn(2, 5),
        values=torch.randn(2, 5),
        mask=torch.ones(2, 5, dtype=torch.bool),
        gamma=0.99,
        lam=0.95,
        last_values=None,
    )
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        gae(**args)


def test_gae_rejects_tensors_on_different_devices():
    meta_values = torch.randn(2, 5, device="meta")
    with pytest.raises(
        RuntimeError, match="values: expected a tensor on cpu \\(the device of rewards\\), got one on meta"
    ):
        gae(torch.randn(2, 5), meta_values, torch.ones(2, 5, dtype=torch.bool), 0.9, 0.9)


def test_gae_names_a_list_argument():
    rewards, mask = torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="rewards: expected a torch.Tensor, got list"):
        gae(rewards.tolist(), torch.randn(2, 5), mask)
    with pytest.raises(TypeError, match="values: expected a torch.Tensor or None, got list"):
        gae(rewards, [[0.0] * 5] * 2, mask)
    with pytest.raises(TypeError, match="last_values: expected a torch.Tensor or None, got list"):
        gae(rewards, torch.randn(2, 5), mask, last_values=[0.0, 0.0])


def test_gae_refuses_meta_tensors():
    meta = dict(device="meta")
    with pytest.raises(RuntimeError, match="rewards: expected a tensor on cpu or cuda .*got one on meta"):
        gae(torch.randn(2, 5, **meta), torch.randn(2, 5, **meta), torch.ones(2, 5, dtype=torch.bool, **meta))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B, T", [(1, 1), (3, 7), (64, 1024), (2, 8192), (5, 1500)])
def test_gae_cuda_matches_cpu(dtype, B, T):
    rewards, values, mask = _inputs(B, T, dtype)
    lv = torch.randn(B)
    cpu = gae(rewards, values, mask, 0.99, 0.95, lv)
    gpu = gae(rewards.cuda(), values.cuda(), mask.cuda(), 0.99, 0.95, lv.cuda())
    atol = 1e-10 if dtype == torch.float64 else 1e-4
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=atol)


@pytest.mark.cuda
def test_gae_cuda_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="values: expected a tensor on"):
        gae(torch.randn(2, 5, device="cuda"), torch.randn(2, 5), torch.ones(2, 5, device="cuda"))
