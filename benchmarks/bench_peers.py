"""rlhf_ext against the peers on the whole RL step: the same training script (peer_script.py) run with TRL's
trainer and with ours, each in its own process, GRPO against TRL's current release and PPO against trl 1.12 (the
last with a PPOTrainer, `trl.experimental.ppo`). Prints seconds per step (median after a warm-up step), the ratio
TRL / ours, our rollout / scoring / update split and the peak RSS of both, and writes them to a JSON file.

    make bench-peers                         # installs the peers into .peers/ on demand, then runs this
    python benchmarks/bench_peers.py --algos grpo --steps 4 --threads 2 --out bench_peers.json

The peers live in their own virtual environments (`--peer-python ALGO=PATH`, made by scripts/peer_venv.sh on our
torch and transformers), never in ours; ours runs on this interpreter with this checkout first on the path.

Our trainers tune glibc's malloc when training on the CPU (`reuse_freed_cpu_memory`); TRL's do not.
`--peer-malloc` hands TRL's process the same settings through the environment (MALLOC_MMAP_MAX_ /
MALLOC_TRIM_THRESHOLD_), to measure the step without that difference.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

# glibc's environment spelling of what rlhf_ext.trainers.base.reuse_freed_cpu_memory sets with mallopt
SAME_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "peer_script.py")
PEER_VERSIONS = {"grpo": "1.16.0", "ppo": "1.12.0"}
DEFAULT_PEER_PYTHON = {
    algo: os.path.join(ROOT, ".peers", f"trl-{v}", "bin", "python") for algo, v in PEER_VERSIONS.items()
}


def run_child(
    python: str, algo: str, impl: str, size: str, steps: int, threads: int, timeout: float, optim=None, malloc=None
):
    """One training run in a fresh process (`malloc`: extra environment variables for it); returns its JSON
    record (the last stdout line)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(malloc or {})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [python, SCRIPT, "--algo", algo, "--impl", impl, "--size", size, "--steps", str(steps)]
    cmd += ["--threads", str(threads)] + (["--optim", optim] if optim else [])
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{algo}/{impl} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {algo}/{impl}: {record['step_seconds']:.2f} s/step, peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)
    return record


def compare(
    algo: str,
    peer_python: str,
    size: str,
    steps: int,
    threads: int,
    rounds: int,
    timeout: float,
    optim=None,
    peer_malloc=False,
):
    """`rounds` alternating runs of TRL and ours (a busy machine drifts: alternation spreads the drift over both);
    the best round's step time of each (the least disturbed) and the largest peak RSS. peer_malloc: TRL's process
    runs with our malloc settings (SAME_MALLOC_ENV)."""
    runs = {"trl": [], "ours": []}
    malloc = SAME_MALLOC_ENV if peer_malloc else None
    for _ in range(rounds):
        runs["trl"].append(run_child(peer_python, algo, "trl", size, steps, threads, timeout, optim, malloc))
        runs["ours"].append(run_child(sys.executable, algo, "ours", size, steps, threads, timeout, optim))
    best = {impl: min(records, key=lambda r: r["step_seconds"]) for impl, records in runs.items()}
    return {
        "algo": algo,
        "peer": f"trl {best['trl']['trl']}",
        "size": best["ours"]["size"],
        "steps": steps,
        "threads": threads,
        "optim": best["ours"].get("optim"),
        "peer_malloc": peer_malloc,
        "trl_step_seconds": best["trl"]["step_seconds"],
        "ours_step_seconds": best["ours"]["step_seconds"],
        "ratio": best["trl"]["step_seconds"] / best["ours"]["step_seconds"],
        "ours_phases": best["ours"].get("phases"),
        "trl_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["trl"]),
        "ours_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["ours"]),
        "runs": runs,
    }


def print_table(results: list) -> None:
    head = f"{'algo':<5} {'peer':<10} {'TRL s/step':>10} {'ours s/step':>11} {'TRL/ours':>8}  "
    head += f"{'ours: rollout / scoring / update (s)':<37} {'RSS MB TRL':>10} {'RSS MB ours':>11}"
    print(head)
    for r in results:
        p = r["ours_phases"] or {}
        split = " / ".join(f"{p[k]:.2f}" for k in ("rollout", "scoring", "update")) if p else "-"
        print(
            f"{r['algo']:<5} {r['peer']:<10} {r['trl_step_seconds']:>10.2f} {r['ours_step_seconds']:>11.2f} "
            f"{r['ratio']:>7.2f}x  {split:<37} {r['trl_peak_rss_mb']:>10.0f} {r['ours_peak_rss_mb']:>11.0f}"
        )


def parse_peer_python(items: list) -> dict:
    out = dict(DEFAULT_PEER_PYTHON)
    for item in items:
        algo, sep, path = item.partition("=")
        if not sep or algo not in PEER_VERSIONS:
            raise SystemExit(f"--peer-python: expected ALGO=PATH with ALGO in {tuple(PEER_VERSIONS)}, got {item!r}")
        out[algo] = path
    return out


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", default="ppo,grpo", help="comma-separated: ppo, grpo")
    parser.add_argument("--size", default="small", choices=("full", "small", "quick"), help="peer_script.SIZES")
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first a warm-up (>= 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both processes")
    parser.add_argument("--rounds", type=int, default=1, help="alternating TRL/ours runs per algorithm")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per run")
    parser.add_argument("--peer-python", action="append", default=[], metavar="ALGO=PATH")
    parser.add_argument(
        "--optim",
        choices=("adamw_torch", "adamw_torch_fused"),  # peer_script.OPTIMIZERS (this file runs it, never imports it)
        default=None,
        help="both configs' optim (default: their default, adamw_torch_fused)",
    )
    parser.add_argument(
        "--peer-malloc",
        action="store_true",
        help="run TRL's process with the malloc settings our trainers apply on the CPU (SAME_MALLOC_ENV)",
    )
    parser.add_argument("--out", default="bench_peers.json")
    cli = parser.parse_args(argv)
    peers = parse_peer_python(cli.peer_python)
    algos = [a.strip() for a in cli.algos.split(",") if a.strip()]
    for algo in algos:
        if algo not in PEER_VERSIONS:
            raise SystemExit(f"--algos: expected a comma-separated subset of {tuple(PEER_VERSIONS)}, got {algo!r}")
        if not os.path.exists(peers[algo]):
            raise SystemExit(f"--peer-python: no interpreter at {peers[algo]} for {algo}; run `make bench-peers`")
    if cli.steps < 2:
        raise SystemExit(f"--steps: expected >= 2 (a warm-up step, then measured ones), got {cli.steps}")
    results = [
        compare(a, peers[a], cli.size, cli.steps, cli.threads, cli.rounds, cli.timeout, cli.optim, cli.peer_malloc)
        for a in algos
    ]
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
    with open(cli.out, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=1)
    print_table(results)
    print(f"(written to {cli.out})")
    return results


if __name__ == "__main__":
    main()
