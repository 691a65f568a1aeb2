"""Masked mean / variance / whitening against plain-PyTorch twins."""

import pytest
import torch

from rlhf_ext.ops import masked_mean, masked_var, masked_whiten
from rlhf_ext.ops.reference import masked_mean_reference, masked_var_reference, masked_whiten_reference


def _inputs(B, T, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, generator=g) * 3 + offset).to(dtype)
    mask = torch.rand(B, T, generator=g) > 0.3
    if B > 1:
        mask[0] = False  # an empty row inside a non-empty batch
    if not mask.any():
        mask[-1, -1] = True
    return x, mask


@pytest.mark.parametrize("B, T", [(1, 7), (3, 423), (64, 1024), (4, 4096), (2, 9000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moments_and_whiten_match_reference(B, T, dtype):
    x, mask = _inputs(B, T, dtype)
    if mask.sum() < 2:
        mask[-1, :2] = True
    xd = x.double()
    torch.testing.assert_close(masked_mean(x, mask).double(), masked_mean_reference(xd, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked_var(x, mask).double(), masked_var_reference(xd, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        masked_var(x, mask, unbiased=False).double(),
        masked_var_reference(xd, mask, unbiased=False),
        rtol=1e-5,
        atol=1e-5,
    )
    for shift_mean in (True, False):
        got = masked_whiten(x, mask, shift_mean=shift_mean)
        assert got.dtype == torch.float32
        torch.testing.assert_close(
            got.double(), masked_whiten_reference(xd, mask, shift_mean=shift_mean), rtol=1e-5, atol=1e-5
        )
        assert torch.all(got[~mask] == 0)


def test_large_offset_is_numerically_stable():
    # Naive sum-of-squares variance loses every digit here; per-block two-pass + Chan's merge does not.
    x, mask = _inputs(8, 5000, offset=1e4)
    torch.testing.assert_close(masked_var(x, mask).double(), masked_var_reference(x.double(), mask), rtol=1e-5, atol=0)


def test_float64_exact():
    x, mask = _inputs(3, 100, torch.float64)
    torch.testing.assert_close(masked_whiten(x, mask), masked_whiten_reference(x, mask), rtol=1e-12, atol=1e-12)


def test_masked_mean_with_dim():
    x, mask = _inputs(4, 9)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), masked_mean_reference(x, mask, dim=1), equal_nan=True)


def test_metamorphic_masked_values_do_not_matter():
    x, mask = _inputs(5, 300)
    y = torch.where(mask, x, torch.full_like(x, 1e6))
    torch.testing.assert_close(masked_whiten(y, mask), masked_whiten(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(masked_var(y, mask), masked_var(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_outside_the_mask_gives_zero(bad, dtype):
    # The contract is 0 outside the mask, whatever sits there (the CUDA kernel writes 0; `mask * y` gave NaN).
    x, mask = _inputs(5, 300, dtype)
    y = torch.where(mask, x, torch.full_like(x, bad))
    for shift_mean in (True, False):
        got = masked_whiten(y, mask, shift_mean=shift_mean)
        ref = masked_whiten_reference(y, mask, shift_mean=shift_mean)
        assert torch.all(got[~mask] == 0) and torch.all(ref[~mask] == 0)
        torch.testing.assert_close(got, masked_whiten(x, mask, shift_mean=shift_mean), rtol=0, atol=0)
        torch.testing.assert_close(ref, masked_whiten_reference(x, mask, shift_mean=shift_mean), rtol=0, atol=0)
    torch.testing.assert_close(masked_mean_reference(y, mask), masked_mean_reference(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(masked_var_reference(y, mask), masked_var_reference(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(masked_mean(y, mask, dim=1), masked_mean(x, mask, dim=1), equal_nan=True)
    a, b = y.double().requires_grad_(), x.double().requires_grad_()
    w = torch.randn(x.shape, dtype=torch.float64)
    (masked_whiten(a, mask) * w).sum().backward()
    (masked_whiten(b, mask) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_thread_count_does_not_change_result():
    x, mask = _inputs(64, 2000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = masked_whiten(x, mask), masked_var(x, mask)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close((masked_whiten(x, mask), masked_var(x, mask)), one, rtol=0, atol=0)


def test_empty_mask_raises():
    x = torch.randn(3, 4)
    empty = torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="mask: selects no element"):
        masked_whiten(x, empty)
    with pytest.raises(ValueError, match="mask: selects no element"):
        masked_var(x, empty)
    single = empty.clone()
    single[1, 2] = True
    with pytest.raises(RuntimeError, match="single element"):
        masked_whiten(x, single)
    torch.testing.assert_close(masked_whiten(x, single, unbiased=False), torch.zeros(3, 4))


def test_masked_mean_of_an_empty_mask_raises():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask: selects no element"):
        masked_mean(x, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask: selects no element"):
        masked_mean(x, torch.zeros(3, 4))  # a 0/1 float mask too
    assert masked_mean(x[:, :0], torch.ones(3, 4, dtype=torch.bool)[:, :0], dim=1).isnan().all()  # per slice: NaN


@pytest.mark.parametrize(
    "dtype, value",
    [
        (torch.float32, 1e30),
        (torch.float32, -3e38),
        (torch.bfloat16, 1e30),
        (torch.float16, 6e4),
        (torch.float64, 1e300),
    ],
)
@pytest.mark.parametrize("numel", [7, 1000, 20000])
def test_constant_huge_values_have_zero_variance(dtype, value, numel):
    # The deviations from the mean are exactly 0; a mean rounded during the summation used to leave
    # deviations of ~1e23 whose squares overflow float32 (and ~1e284 for float64).
    x = torch.full((numel,), value, dtype=dtype)
    mask = torch.ones(numel, dtype=torch.bool)
    mask[::3] = False
    x[~mask] = float("nan")  # masked garbage stays out
    assert masked_var(x, mask).item() == 0
    assert masked_var(x, mask, unbiased=False).item() == 0
    assert masked_mean(x, mask).item() == torch.tensor(value, dtype=dtype).to(masked_mean(x, mask).dtype).item()
    assert (masked_whiten(x, mask)[mask] == 0).all()
    assert masked_var_reference(x, mask).item() == 0


def test_gradients_match_reference():
    x, mask = _inputs(3, 11, torch.float64)
    for shift_mean in (True, False):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        w = torch.randn_like(x)
        (masked_whiten(a, mask, shift_mean=shift_mean) * w).sum().backward()
        (masked_whiten_reference(b, mask, shift_mean=shift_mean) * w).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    (masked_mean(a, mask) * 2 + masked_var(a, mask) * 3).backward()
    (masked_mean_reference(b, mask) * 2 + masked_var_reference(b, mask) * 3).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_gradcheck():
    x, mask = _inputs(2, 6, torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: masked_whiten(t, mask, eps=0.0), (x,))
    assert torch.autograd.gradcheck(lambda t: torch.ops.rlhf_ext.masked_moments(t, mask), (x,))


def test_opcheck():
    x, mask = _inputs(3, 17)
    torch.library.opcheck(torch.ops.rlhf_ext.masked_moments, (x, mask))
    torch.library.opcheck(torch.ops.rlhf_ext.masked_whiten, (x, mask, True, True, 1e-8))
    xd = x.double().requires_grad_()
    torch.library.opcheck(torch.ops.rlhf_ext.masked_whiten, (xd, mask, False, True, 1e-8))


def test_torch_compile_fullgraph():
    def fn(x, mask):
        return masked_whiten(x, mask) + masked_mean(x, mask)

    x, mask = _inputs(4, 31)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), fn(x, mask))


@pytest.mark.parametrize(
    "x, mask, match",
    [
        (torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool), "mask: expected shape \\[2, 3\\]"),
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.bool), "x: expected a float32"),
    ],
)
def test_bad_inputs(x, mask, match):
    with pytest.raises(RuntimeError, match=match):
        masked_whiten(x, mask)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B, T", [(1, 7), (64, 1024), (3, 50000)])
def test_cuda_matches_cpu(dtype, B, T):
    x, mask = _inputs(B, T, dtype)
    torch.testing.assert_close(masked_whiten(x.cuda(), mask.cuda()).cpu(), masked_whiten(x, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked_var(x.cuda(), mask.cuda()).cpu(), masked_var(x, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="selects no element"):
        masked_whiten(x.cuda(), torch.zeros_like(mask).cuda())
