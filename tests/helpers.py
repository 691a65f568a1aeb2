"""Shared test utilities: devices, dtype tolerances, error matching."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Tolerances for outputs computed from inputs of each dtype (after the inputs are rounded to that
# dtype, so they measure the kernel's accumulation error, not the input rounding).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-4, atol=1e-4),
}
