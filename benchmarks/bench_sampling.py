"""Fused sampler against the baseline `rlhf-ext bench` uses, its twin `rlhf_ext.ops.reference.sample_reference`:
what HF does (full sorts for top-k / top-p, softmax, torch.multinomial) plus the log-prob gather the trainer needs.

Logits are N(0, 1) * 4, which gives a peaked, LLM-like distribution (the top-p 0.9 set is a few hundred
tokens); `top_p 0.9 flat` uses N(0, 1) logits, whose top-p set is most of the vocabulary (the op's worst case).
Run `pytest benchmarks/bench_sampling.py` (ratios printed at the end) or `python benchmarks/bench_sampling.py`.
"""

import time

import pytest
import torch

from benchmarks.conftest import sizes, synced
from rlhf_ext.ops import sample
from rlhf_ext.ops.reference import sample_reference

SHAPES = sizes([(64, 32000), (64, 128256)], [(4, 500)])
SETTINGS = {
    "top_k 50 + top_p 0.9": (4.0, dict(top_k=50, top_p=0.9)),
    "top_p 0.9 flat": (1.0, dict(top_p=0.9)),
    "plain": (4.0, dict()),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _case(B, V, setting, device):
    scale, kw = SETTINGS[setting]
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)).mul_(scale).to(device)
    return {
        "fused": lambda: sample(logits, **kw),
        "reference": lambda: sample_reference(logits, **kw),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, V", SHAPES)
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_sample(benchmark, impl, setting, B, V, device):
    fn = _case(B, V, setting, device)[impl]
    benchmark.group = f"sample {device} {setting} B={B} V={V}"
    benchmark.extra_info["role"] = impl
    benchmark(synced(fn, device))


def _median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))  # optional: python benchmarks/bench_sampling.py THREADS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of 5 (fused) / 3 (baseline) calls")
    for B, V in SHAPES:
        for setting in SETTINGS:
            fns = _case(B, V, setting, "cpu")
            fused, base = _median_ms(fns["fused"], 5), _median_ms(fns["reference"], 3)
            print(
                f"B={B} V={V:<7} {setting:<22} fused {fused:8.2f} ms  ref {base:9.2f} ms  speedup {base / fused:6.1f}x"
            )
