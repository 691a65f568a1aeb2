"""packed_linear: a decode step's few-row lm_head product against a packed weight, against F.linear (what HF's
lm_head runs), MKL's transposed product `(weight @ hidden^T)^T` (what the CPU decode ran before packed_linear) and
the unpacking reference. The packing itself (once per rollout) is timed in its own group. CPU only."""

import pytest
import torch

from benchmarks.conftest import sizes
from rlhf_ext.ops import pack_linear_weight, packed_linear
from rlhf_ext.ops.reference import packed_linear_reference

# (rows, hidden, vocab): PPO's 16 rows and GRPO's 32 at the peer benchmark's hidden sizes, a 64-row batch, one row.
SHAPES = sizes(
    [(16, 256, 32000), (32, 256, 32000), (16, 384, 32000), (64, 384, 32000), (1, 1024, 32000)], [(4, 16, 40)]
)


def _inputs(M, K, N):
    g = torch.Generator().manual_seed(0)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5


@pytest.mark.parametrize("M, K, N", SHAPES)
@pytest.mark.parametrize("impl", ["fused", "linear", "mkl_transposed", "reference"])
def test_packed_linear(benchmark, impl, M, K, N):
    hidden, weight = _inputs(M, K, N)
    packed = pack_linear_weight(weight)
    fn = {
        "fused": lambda: packed_linear(hidden, packed, N),
        "linear": lambda: torch.nn.functional.linear(hidden, weight),
        "mkl_transposed": lambda: torch.mm(weight, hidden.t()).t().contiguous(),
        "reference": lambda: packed_linear_reference(hidden, packed, N),
    }[impl]
    benchmark.group = f"packed_linear cpu {M}x{K}x{N}"
    benchmark.extra_info["role"] = impl
    benchmark(fn)


@pytest.mark.parametrize("M, K, N", SHAPES[:1])
def test_pack_linear_weight(benchmark, M, K, N):
    """The one-off cost per rollout, to set against the per-step saving above."""
    _, weight = _inputs(M, K, N)
    benchmark.group = f"pack_linear_weight cpu {K}x{N}"
    benchmark.extra_info["role"] = "pack"
    benchmark(lambda: pack_linear_weight(weight))
