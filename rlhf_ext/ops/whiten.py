"""Masked mean, variance and whitening: one fused pass for the moments, one for the normalisation.

An all-masked input is an error (the statistics are undefined), as is an unbiased variance of a
single element; we raise rather than return NaN so a bad batch stops training visibly.
"""

from typing import Optional

import torch

from rlhf_ext.ops._common import as_bool_mask, check_devices, check_float_dtype, out_float_dtype


@torch.library.register_fake("rlhf_ext::masked_moments")
def _moments_fake(x, mask):
    return x.new_empty((3,), dtype=out_float_dtype(x.dtype))


@torch.library.register_fake("rlhf_ext::masked_whiten")
def _whiten_fake(x, mask, shift_mean, unbiased, eps):
    return x.new_empty(x.shape, dtype=out_float_dtype(x.dtype))


def _moments_setup(ctx, inputs, output):
    x, mask = inputs
    ctx.save_for_backward(x, mask, output)


def _moments_backward(ctx, grad):
    x, mask, moments = ctx.saved_tensors
    count, mean = moments[0], moments[1]
    # d mean / dx = m / n ; d M2 / dx = 2 m (x - mean)  (the mean's own dependence cancels in M2). Masked
    # positions are selected away, not multiplied by 0, so inf/NaN there gives a 0 gradient, not NaN.
    grad_x = torch.where(mask, grad[1] / count + 2.0 * grad[2] * (x.to(grad.dtype) - mean), 0.0)
    return grad_x.to(x.dtype), None


torch.library.register_autograd("rlhf_ext::masked_moments", _moments_backward, setup_context=_moments_setup)


def _whiten_setup(ctx, inputs, output):
    x, mask, shift_mean, unbiased, eps = inputs
    ctx.save_for_backward(x, mask)
    ctx.shift_mean, ctx.unbiased, ctx.eps = shift_mean, unbiased, eps


def _whiten_backward(ctx, grad):
    # Never on the hot path (advantages carry no gradient), so plain torch ops are enough here.
    x, mask = ctx.saved_tensors
    m = mask.to(grad.dtype)
    xf = torch.where(mask, x.to(grad.dtype), 0.0)  # inf/NaN outside the mask must not reach the sums
    n = m.sum()
    mean = (xf * m).sum() / n
    centred = (xf - mean) * m
    denom = n - 1 if ctx.unbiased else n
    std = torch.sqrt((centred * centred).sum() / denom + ctx.eps)
    g = grad * m
    y = centred / std
    grad_x = g / std - g.sum() / (n * std) - y * (g * y).sum() / (denom * std)
    if not ctx.shift_mean:
        grad_x = grad_x + g.sum() / n
    return (grad_x * m).to(x.dtype), None, None, None, None


torch.library.register_autograd("rlhf_ext::masked_whiten", _whiten_backward, setup_context=_whiten_setup)


def _moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """(count, mean, M2) from the fused kernel; raises if the mask selects nothing (or a single element
    when `unbiased`). The count check reads one number back (skipped while compiling)."""
    check_devices("x", x, mask=mask)
    moments = torch.ops.rlhf_ext.masked_moments(x, as_bool_mask(mask))
    count = int(moments[0].item()) if not torch.compiler.is_compiling() else None
    if count is not None:
        if count == 0:
            raise ValueError("mask: selects no element (mask.sum() == 0); masked statistics are undefined")
        if unbiased and count == 1:
            raise ValueError(
                "mask: selects a single element, so the unbiased variance is undefined; pass unbiased=False"
            )
    return moments


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of `x` where `mask` is set. `dim=None`: a 0-dim float32 tensor from the fused kernel; raises
    if the mask selects nothing. With `dim`, the per-slice mean (a masked sum divided by the count;
    slices with an empty mask give NaN, as torch's mean of nothing does)."""
    if dim is not None:
        check_devices("x", x, mask=mask)
        check_float_dtype("x", x)  # as the fused kernel of the dim=None path checks
        if mask.shape != x.shape:
            raise ValueError(f"mask: expected shape {list(x.shape)} (the shape of x), got {list(mask.shape)}")
        keep = as_bool_mask(mask)
        m = keep.to(out_float_dtype(x.dtype))
        return torch.where(keep, x.to(m.dtype), 0.0).sum(dim) / m.sum(dim)
    return _moments(x, mask)[1]


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` where `mask` is set (0-dim). Raises if the mask selects nothing, or one element
    with `unbiased=True`."""
    moments = _moments(x, mask, unbiased)
    return moments[2] / (moments[0] - 1 if unbiased else moments[0])


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True
) -> torch.Tensor:
    """`(x - mean) / sqrt(var + eps)` with masked statistics; positions outside the mask are 0 in
    the output. With `shift_mean=False` the mean is added back (only the scale changes)."""
    check_devices("x", x, mask=mask)
    return torch.ops.rlhf_ext.masked_whiten(x, as_bool_mask(mask), bool(shift_mean), bool(unbiased), float(eps))


def bench_cases():
    """Shapes for `rlhf-ext bench`: fused whitening against the composed masked mean/var/whiten."""
    from rlhf_ext.ops.reference import masked_whiten_reference

    B, T = 64, 1024
    x = torch.randn(B, T)
    mask = torch.rand(B, T) > 0.2
    return [
        (
            "masked_whiten fwd",
            f"{B}x{T}",
            lambda: masked_whiten(x, mask),
            lambda: masked_whiten_reference(x, mask),
        )
    ]
