"""decode_step: one KV-cached decode step of a Llama-style stack as one op, against its eager twin (the same ops
transformers' layers run, without their module calls). Shapes: the peer benchmark's small Llama (hidden 256, 4
layers, 4 heads / 2 kv heads, intermediate 512) with PPO's 16 rows and GRPO's 32, and the full one (hidden 384, 6
layers, 6 / 3 heads, intermediate 768) with 32 rows; slot 63 of 96 (160). bench_rollout.py times whole rollouts
with and without it. CPU only."""

import pytest

from benchmarks.conftest import sizes
from rlhf_ext.ops import decode_step
from rlhf_ext.ops.decode_step import _random_step
from rlhf_ext.ops.reference import decode_step_reference

# (B, H, heads, kv_heads, head_dim, intermediate, layers, capacity, slot)
SHAPES = sizes(
    [(16, 256, 4, 2, 64, 512, 4, 96, 63), (32, 256, 4, 2, 64, 512, 4, 96, 63), (32, 384, 6, 3, 64, 768, 6, 160, 95)],
    [(3, 32, 4, 2, 8, 40, 2, 12, 7)],
)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}L{s[6]}")
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_decode_step(benchmark, impl, shape):
    args = _random_step(*shape)
    fn = decode_step if impl == "fused" else decode_step_reference
    B, H, heads, kv, _, _, layers, _, slot = shape
    benchmark.group = f"decode_step cpu B{B} H{H} L{layers} heads {heads}/{kv} slot {slot}"
    benchmark.extra_info["role"] = impl
    benchmark(lambda: fn(*args))
