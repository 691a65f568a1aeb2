"""Shared benchmark plumbing (pytest-benchmark).

Each benchmark sets `benchmark.extra_info["role"]` to "fused" or to a baseline's name and uses
`benchmark.group` for the shape; at the end of the run a table of baseline/fused ratios per group
is printed, so every speed figure is a ratio measured in the same run.

`RLHF_EXT_BENCH_QUICK=1` shrinks every sweep to tiny shapes: `make test` runs all benchmark files
that way (with --benchmark-disable, each function once) so they cannot rot, while the real sweeps
run with `make bench-full` / `pytest benchmarks`.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

QUICK = os.environ.get("RLHF_EXT_BENCH_QUICK") == "1"


def sizes(full, quick):
    """The sweep to run: `full` normally, `quick` under RLHF_EXT_BENCH_QUICK=1."""
    return quick if QUICK else full


def sync(device) -> None:
    """Wait for the device: CUDA kernels run asynchronously, and a timing must include them."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def synced(fn, device):
    """`fn` followed by a device sync: the callable a kernel benchmark times."""

    def run():
        out = fn()
        sync(device)
        return out

    return run


PHASES = ("rollout", "scoring", "update")


def benchmark_phases(benchmark, group: str, role: str, make_step) -> None:
    """Time one round of an RL step for pytest-benchmark. `make_step()` (untimed setup) returns the step;
    calling it runs the step and returns {phase: seconds}, which go into extra_info."""
    split = {}
    benchmark.group = group
    benchmark.extra_info["role"] = role
    benchmark.pedantic(lambda step: split.update(step()), setup=lambda: ((make_step(),), {}), rounds=1, iterations=1)
    benchmark.extra_info.update({f"time/{k}": v for k, v in split.items()})
    assert set(split) == set(PHASES)


def print_phase_table(results: dict) -> None:
    """Print the per-phase split of one RL step, `results = {"eager"|"fused": {phase: seconds}}`, with
    the eager/fused ratio of each phase and of the total."""
    print(f"{'phase':<10}{'eager s':>10}{'ours s':>10}{'speedup':>9}")
    for phase in PHASES:
        e, o = results["eager"][phase], results["fused"][phase]
        print(f"{phase:<10}{e:>10.2f}{o:>10.2f}{e / o:>8.2f}x")
    e, o = sum(results["eager"].values()), sum(results["fused"].values())
    print(f"{'total':<10}{e:>10.2f}{o:>10.2f}{e / o:>8.2f}x")


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups = {}
    for bench in session.benchmarks:
        if not getattr(bench, "stats", None) or bench.stats is None:
            continue
        role = bench.extra_info.get("role", bench.name)
        groups.setdefault(bench.group or bench.name, {})[role] = bench.stats.median
    lines = []
    for group, roles in sorted(groups.items()):
        fused = roles.get("fused")
        if fused is None:
            continue
        for role, median in sorted(roles.items()):
            if role != "fused":
                lines.append(
                    f"{group:<48} {role:<28} fused {fused * 1e3:9.3f} ms   {role} {median * 1e3:9.3f} ms   "
                    f"speedup {median / fused:7.1f}x"
                )
    if lines:
        terminalreporter.write_sep("=", "rlhf_ext speedups (baseline median / fused median, same run)")
        for line in lines:
            terminalreporter.write_line(line)
