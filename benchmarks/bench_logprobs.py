"""gather_logprobs and fused_linear_logprobs against what RLHF code does today, in the same run:
- eager: `log_softmax(logits.float()).gather(...)`, which materialises a full [N, V] float32 tensor;
- trl_rowloop: the label logit minus a logsumexp taken one row at a time (TRL's memory-saving path).

Timings go through pytest-benchmark (the ratios are printed by benchmarks/conftest.py). Peak memory
is the growth of the process's peak resident set while one call runs: Linux lets a process reset its
own high-water mark (`echo 5 > /proc/self/clear_refs`), so VmHWM after the call minus VmRSS before
it counts every page the call touched, torch allocations included (tracemalloc cannot see them).
Large tensors are mmapped and unmapped on free, so what is released returns to the OS.

The README's two peak-memory rows are guarded by `test_peak_memory_ratios`, which measures the fused op and its
baseline in the same run with torch's profiler (every CPU allocation and free torch makes, in order, so it works
at the tiny quick shapes too, where the resident set is too coarse) and asserts the ratio.

V = 128256 runs with RLHF_EXT_BENCH_ROWS_128K rows (default 2048: at 8192 rows the eager baselines
need 10-17 GB, more than a shared runner has); V = 32000 runs at N = 8192.
"""

import ctypes
import gc
import os
import platform

import pytest
import torch

from benchmarks.conftest import sizes
from rlhf_ext.ops import fused_linear_logprobs, gather_logprobs
from rlhf_ext.ops.reference import gather_logprobs_eager, gather_logprobs_rowloop

ROWS_128K = int(os.environ.get("RLHF_EXT_BENCH_ROWS_128K", "2048"))
SHAPES = sizes([(8192, 32000), (ROWS_128K, 128256)], [(16, 300)])
# N, H, V. The peak memory is measured at the shape; the timing, which is matmul-bound (the
# fused path recomputes the logits: 4 GEMMs instead of 3), at a quarter of the rows to stay short.
LINEAR = sizes((16384, 512, 32000), (64, 16, 300))
LINEAR_TIMED = sizes((4096, 512, 32000), (64, 16, 300))
DTYPES = [torch.float32, torch.bfloat16]
IMPLS = ["fused", "eager", "trl_rowloop"]
ROUNDS = sizes(3, 1)
# The fused_linear memory ratio needs N * V well above one chunk's logits (>= 64 rows), even in the quick run.
LINEAR_MEMORY = sizes(LINEAR, (1024, 32, 4000))


def _forward_fn(impl):
    return {
        "fused": lambda x, y: gather_logprobs(x, y),
        "eager": gather_logprobs_eager,
        "trl_rowloop": gather_logprobs_rowloop,
    }[impl]


def _inputs(N, V, dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, V, generator=g) * 2).to(dtype), torch.randint(0, V, (N,), generator=g)


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn):
    """Peak resident-set growth during fn() (None where the kernel cannot reset the high-water mark).

    glibc's free memory is handed back to the OS first (malloc_trim): in a process whose malloc keeps freed memory
    (rlhf_ext's trainers tune it so on the CPU: `reuse_freed_cpu_memory`), fn's buffers would otherwise come from
    pages already resident and the growth would read 0."""
    gc.collect()
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def allocated_peak_bytes(fn) -> int:
    """Peak of the bytes torch allocates on the CPU while fn() runs, above what was allocated before: the running
    sum of the profiler's allocation (+) and free (-) records, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    peak = current = 0
    for _, nbytes in records:
        current += nbytes
        peak = max(peak, current)
    return peak


def _report(capsys, line):
    with capsys.disabled():  # shown in the run's output, not only in the captured log
        print(line)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, V", SHAPES)
def test_forward(benchmark, impl, dtype, N, V):
    logits, labels = _inputs(N, V, dtype)
    fn = _forward_fn(impl)
    benchmark.group = f"logprobs fwd cpu {str(dtype)[6:]} N={N} V={V}"
    benchmark.extra_info["role"] = impl
    with torch.no_grad():
        benchmark.pedantic(fn, args=(logits, labels), rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, V", SHAPES)
def test_forward_backward(benchmark, impl, dtype, N, V):
    logits, labels = _inputs(N, V, dtype)
    leaf = logits.requires_grad_()
    fn = _forward_fn(impl)

    def run():
        leaf.grad = None
        fn(leaf, labels).sum().backward()

    benchmark.group = f"logprobs fwd+bwd cpu {str(dtype)[6:]} N={N} V={V}"
    benchmark.extra_info["role"] = impl
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N, V", SHAPES[:1])
def test_peak_memory_forward(capsys, impl, N, V):
    logits, labels = _inputs(N, V, torch.float32)
    fn = _forward_fn(impl)
    with torch.no_grad():
        fn(logits, labels)  # warm-up: first-call allocations of the dispatcher and thread pool
        extra = peak_extra_bytes(lambda: fn(logits, labels))
    if extra is None:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    _report(
        capsys,
        f"\npeak memory, forward fp32 N={N} V={V}: {impl:<12} {extra / 2**20:9.1f} MiB "
        f"(the logits themselves: {N * V * 4 / 2**20:.1f} MiB)",
    )


def _linear_inputs(N, H, V):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g)


def _linear_fn(impl, hidden, weight, labels):
    def run():
        hidden.grad = weight.grad = None
        if impl == "fused":
            lp = fused_linear_logprobs(hidden, weight, labels)
        elif impl == "unfused_gather":  # materialised logits, our kernel, gradient written in place
            lp = gather_logprobs(hidden @ weight.t(), labels, inplace_backward=True)
        else:  # unfused_eager
            lp = gather_logprobs_eager(hidden @ weight.t(), labels)
        lp.sum().backward()

    return run


@pytest.mark.parametrize("impl", ["fused", "unfused_gather", "unfused_eager"])
def test_fused_linear_forward_backward(benchmark, impl):
    N, H, V = LINEAR_TIMED
    run = _linear_fn(impl, *_linear_inputs(N, H, V))
    benchmark.group = f"fused_linear fwd+bwd cpu fp32 N={N} H={H} V={V}"
    benchmark.extra_info["role"] = impl
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fused", "unfused_gather", "unfused_eager"])
def test_fused_linear_peak_memory(capsys, impl):
    N, H, V = LINEAR
    hidden, weight, labels = _linear_inputs(N, H, V)
    _linear_fn(impl, *_linear_inputs(64, H, 300))()  # warm-up at a tiny shape (dispatch, thread pool)
    extra = peak_extra_bytes(_linear_fn(impl, hidden, weight, labels))
    if extra is None:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    _report(
        capsys,
        f"\npeak memory, fused_linear fwd+bwd fp32 N={N} H={H} V={V}: {impl:<15} "
        f"{extra / 2**20:9.1f} MiB (one [N, V] fp32: {N * V * 4 / 2**20:.1f} MiB)",
    )


def test_peak_memory_ratios(capsys):
    """The README's peak-memory rows, as ratios measured here: gather_logprobs' forward allocates next to nothing
    beside its [N] outputs (under 2 % of eager's, which builds a full [N, V] float32 log-softmax), and
    fused_linear_logprobs fwd+bwd peaks under a quarter of the matmul + gather_logprobs path (README: 7.9 %)."""
    N, V = SHAPES[0]
    logits, labels = _inputs(N, V, torch.float32)
    with torch.no_grad():
        peaks = {impl: allocated_peak_bytes(lambda: _forward_fn(impl)(logits, labels)) for impl in ("fused", "eager")}
    _report(capsys, f"\nallocated peak, forward fp32 N={N} V={V}: {peaks}")
    assert peaks["eager"] >= N * V * 4, peaks  # the baseline does materialise [N, V]
    assert peaks["fused"] < 0.02 * peaks["eager"], peaks

    N, H, V = LINEAR_MEMORY
    peaks = {
        impl: allocated_peak_bytes(_linear_fn(impl, *_linear_inputs(N, H, V))) for impl in ("fused", "unfused_gather")
    }
    _report(capsys, f"\nallocated peak, fused_linear fwd+bwd fp32 N={N} H={H} V={V}: {peaks}")
    assert peaks["unfused_gather"] >= N * V * 4, peaks
    assert peaks["fused"] < 0.25 * peaks["unfused_gather"], peaks
