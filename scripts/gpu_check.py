"""`make gpu-check`: everything about the CUDA kernels that only a real GPU can check, in one call of at most
~8 minutes on an H100/H200 with 16 cores. Steps, each with a time cap inside one overall budget (--budget):

  build      the CUDA extension for this GPU only, in place: `python setup.py build_ext --inplace` with
             TORCH_CUDA_ARCH_LIST = the GPU's compute capability, MAX_JOBS = the core count (16 on the lent
             machines), RLHF_EXT_FORCE_CUDA=1. In place rather than into a venv or through pip: the machine's own
             CUDA torch is the one to build against, nothing is installed or downloaded (pip's isolation and
             dependency resolution do not come into it), and the later steps import the package from the source
             tree (PYTHONPATH). The .so and build/ are git-ignored.
  tests      `pytest -m cuda` over the test files that hold CUDA tests, with `datasets` and `fastapi` made
             unimportable (the GPU machines lack them; tests/test_gpu_check.py checks collection without them).
  sanitizer  compute-sanitizer memcheck and racecheck over one small nvcc-built driver per kernel family
             (scripts/sanitizer/<family>_driver.cu over the launchers of csrc/cuda/<family>.cuh).
  bench      benchmarks/gpu_figures.py: the figures, each against its eager PyTorch baseline in the same run.
  report     <out>/report.md and <out>/report.json (default out: build/gpu-check).

Exit codes: 0 every step passed; 1 a step failed or timed out (the report says which, with its log); 2 nothing
can run here (no CUDA GPU, a torch without CUDA, or no nvcc): one line says why and what it would have done.
A step the machine cannot host (e.g. compute-sanitizer refusing the device) is reported as skipped, with why.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("gae", "whiten", "logprobs", "ppo_loss", "sampling")
SANITIZER_TOOLS = ("memcheck", "racecheck")
UNAVAILABLE_MODULES = ("datasets", "fastapi")
EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE = 0, 1, 2
STEP_CAPS_S = {"build": 300, "tests": 150, "sanitizer": 150, "bench": 240}
PLAN = (
    "build the CUDA extension for this GPU's architecture, run `pytest -m cuda`, run compute-sanitizer "
    "(memcheck, racecheck) over a driver of each kernel family, time the GPU benchmarks against their eager "
    "baselines and write report.md / report.json"
)
# Runs pytest with the modules the GPU machines do not have made unimportable (a None entry in sys.modules).
BLOCK_AND_RUN_PYTEST = (
    "import sys; [sys.modules.__setitem__(m, None) for m in sys.argv[1].split(',')]; "
    "import pytest; sys.exit(pytest.main(sys.argv[2:]))"
)


def find_tool(name: str):
    """A CUDA tool on PATH, else under CUDA_HOME / the usual install folder."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    return None


def unavailable_reason():
    """Why the GPU check cannot run on this machine, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if find_tool("nvcc") is None:
        return "nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda)"
    return None


def gpu_arch() -> str:
    """The visible GPU's compute capability as TORCH_CUDA_ARCH_LIST wants it, e.g. "9.0"."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def cuda_test_files(root: str = ROOT) -> list:
    """The test files that hold `pytest.mark.cuda` tests (the only ones `pytest -m cuda` would run)."""
    files = []
    for path in sorted(glob.glob(os.path.join(root, "tests", "test_*.py"))):
        with open(path) as f:
            if "mark.cuda" in f.read():
                files.append(os.path.relpath(path, root))
    return files


def pytest_command(python: str, files, *args) -> list:
    return [
        python,
        "-c",
        BLOCK_AND_RUN_PYTEST,
        ",".join(UNAVAILABLE_MODULES),
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        *args,
        *files,
    ]


def nvcc_command(nvcc: str, family: str, arch: str, output: str) -> list:
    """Build one sanitizer driver for `arch` ("9.0") with line info, so reports point at source lines."""
    sm = arch.replace(".", "")
    return [
        nvcc,
        "-std=c++17",
        "-O2",
        "-lineinfo",
        "-gencode",
        f"arch=compute_{sm},code=sm_{sm}",
        "-I",
        os.path.join(ROOT, "csrc", "cuda"),
        "-I",
        os.path.join(ROOT, "scripts", "sanitizer"),
        os.path.join(ROOT, "scripts", "sanitizer", f"{family}_driver.cu"),
        "-o",
        output,
    ]


def sanitizer_command(sanitizer: str, tool: str, binary: str) -> list:
    return [sanitizer, "--tool", tool, "--error-exitcode", "99", "--print-limit", "20", binary]


def run_logged(cmd, log_path: str, timeout: float, env=None, cwd=ROOT) -> dict:
    """Run `cmd` with its output in `log_path`; {"rc", "seconds", "timed_out", "tail"}."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=max(1.0, timeout)
            ).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    with open(log_path) as log:
        tail = log.read()[-1500:]
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "timed_out": timed_out, "tail": tail}


def step_result(outcome: dict, log: str, skipped_reason=None) -> dict:
    if skipped_reason:
        return {"status": "skipped", "why": skipped_reason, "seconds": outcome.get("seconds"), "log": log}
    status = "passed" if outcome["rc"] == 0 else "failed"
    why = "timed out" if outcome["timed_out"] else (None if status == "passed" else f"exit code {outcome['rc']}")
    return {"status": status, "why": why, "seconds": outcome["seconds"], "log": log, "tail": outcome["tail"]}


def sanitizer_step(arch: str, out_dir: str, timeout: float) -> dict:
    """Compile every driver, then run each under each tool in parallel. {"status", "runs": {name: result}}."""
    nvcc, sanitizer = find_tool("nvcc"), find_tool("compute-sanitizer")
    if sanitizer is None:
        return {"status": "skipped", "why": "compute-sanitizer not found", "runs": {}}
    deadline = time.monotonic() + timeout
    runs = {}

    def compile_and_check(family):
        binary = os.path.join(out_dir, f"{family}_driver")
        log = os.path.join(out_dir, f"nvcc_{family}.log")
        built = run_logged(nvcc_command(nvcc, family, arch, binary), log, deadline - time.monotonic())
        results = {f"nvcc {family}": step_result(built, log)}
        for tool in SANITIZER_TOOLS:
            if built["rc"] != 0:
                break
            log = os.path.join(out_dir, f"{tool}_{family}.log")
            outcome = run_logged(sanitizer_command(sanitizer, tool, binary), log, deadline - time.monotonic())
            refused = "Device not supported" in outcome["tail"] and outcome["rc"] != 0
            results[f"{tool} {family}"] = step_result(
                outcome, log, "compute-sanitizer refused this device" if refused else None
            )
        return results

    with ThreadPoolExecutor(max_workers=len(FAMILIES)) as pool:
        for results in pool.map(compile_and_check, FAMILIES):
            runs.update(results)
    statuses = {r["status"] for r in runs.values()}
    status = "failed" if "failed" in statuses else ("skipped" if statuses == {"skipped"} else "passed")
    why = None if status == "passed" else ", ".join(k for k, r in runs.items() if r["status"] == status)
    return {"status": status, "why": why, "runs": runs}


def fmt(value, unit="", digits=1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def render_markdown(results: dict) -> str:
    """The report as markdown: the machine, each step's status, then the figures table."""
    machine = results.get("machine", {})
    lines = ["# rlhf_ext GPU check", ""]
    if machine:
        lines += [
            f"Device: {machine.get('device', '?')} ({machine.get('sms', '?')} SMs), torch {machine.get('torch')}"
            f" / CUDA {machine.get('cuda')}, built for {results.get('arch', '?')}. Peak HBM "
            f"{fmt(machine.get('peak_hbm_gbs'), ' GB/s', 0)} ({machine.get('peak_hbm_source', '?')}); "
            f"device-to-device copy reached {fmt(machine.get('copy_gbs'), ' GB/s', 0)}.",
            "",
        ]
    lines += ["| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, step in results.get("steps", {}).items():
        lines.append(f"| {name} | {step['status']} | {fmt(step.get('seconds'))} | {step.get('why') or ''} |")
        for run_name, run in step.get("runs", {}).items():
            lines.append(
                f"| &nbsp;&nbsp;{run_name} | {run['status']} | {fmt(run.get('seconds'))} | {run.get('why') or ''} |"
            )
    figures = results.get("figures", [])
    if figures:
        lines += ["", "| figure | shape | fused | baseline | speedup | note |", "| --- | --- | --- | --- | --- | --- |"]
        for f in figures:
            notes = []
            if f.get("hbm_share") is not None:
                notes.append(f"{fmt(f['achieved_gbs'], ' GB/s', 0)} = {fmt(100 * f['hbm_share'], '% of HBM peak')}")
            if f.get("tokens_per_s") is not None:
                notes.append(f"{fmt(f['tokens_per_s'], ' tokens/s', 0)}, {fmt(f['speedup_vs_hf'], 'x', 2)} HF generate")
            if f.get("baseline_scaled_from"):
                notes.append(f"baseline timed on {f['baseline_scaled_from']} rows (memory), scaled linearly")
            baseline = f"{f.get('baseline', '')}: {fmt(f.get('baseline_us'), ' µs')}"
            lines.append(
                f"| {f['name']} | {f['shape']} | {fmt(f.get('fused_us'), ' µs')} | {baseline} | "
                f"{fmt(f.get('speedup'), 'x', 2)} | {'; '.join(notes)} |"
            )
    for name, error in results.get("figure_errors", {}).items():
        lines.append(f"\nFigures of {name} not measured: {error}")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str) -> tuple:
    """Write report.md and report.json under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, "report.md"), os.path.join(out_dir, "report.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    with open(md_path, "w") as f:
        f.write(render_markdown(results))
    return md_path, json_path


def overall_exit(results: dict) -> int:
    return EXIT_FAILED if any(s["status"] == "failed" for s in results["steps"].values()) else EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="rlhf_ext GPU check (build, CUDA tests, sanitizers, benchmarks)")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-check"), help="report folder")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    parser.add_argument("--steps", default="build,tests,sanitizer,bench", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEP_CAPS_S) - {""}
    if unknown:
        parser.error(f"--steps: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(STEP_CAPS_S)}")
    reason = unavailable_reason()
    if reason:
        print(f"gpu-check: {reason}; nothing was run. On a CUDA machine it would {PLAN}.", file=sys.stderr)
        return EXIT_UNAVAILABLE
    deadline = time.monotonic() + args.budget
    steps = [s for s in args.steps.split(",") if s and not (s == "build" and args.skip_build)]
    os.makedirs(args.out, exist_ok=True)
    arch = gpu_arch()
    cores = str(os.cpu_count() or 16)
    env = dict(
        os.environ,
        TORCH_CUDA_ARCH_LIST=arch,
        MAX_JOBS=cores,
        RLHF_EXT_FORCE_CUDA="1",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
    )
    results = {"arch": arch, "steps": {}, "figures": [], "figure_errors": {}, "plan": PLAN}

    def remaining(step):
        return min(STEP_CAPS_S[step], deadline - time.monotonic())

    for step in steps:
        log = os.path.join(args.out, f"{step}.log")
        print(f"gpu-check: {step} ...", flush=True)
        if step == "build":
            outcome = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"], log, remaining(step), env)
            results["steps"][step] = step_result(outcome, log)
            if outcome["rc"] != 0:
                break  # nothing after this can run without the extension
        elif step == "tests":
            cmd = pytest_command(sys.executable, cuda_test_files(), "-q", "-rs")
            results["steps"][step] = step_result(run_logged(cmd, log, remaining(step), env), log)
        elif step == "sanitizer":
            start = time.monotonic()
            results["steps"][step] = sanitizer_step(arch, args.out, remaining(step))
            results["steps"][step]["seconds"] = round(time.monotonic() - start, 1)
        elif step == "bench":
            figures_json = os.path.join(args.out, "figures.json")
            cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_figures.py"), "--json", figures_json]
            results["steps"][step] = step_result(run_logged(cmd, log, remaining(step), env), log)
            if os.path.exists(figures_json):
                with open(figures_json) as f:
                    measured = json.load(f)
                results.update(
                    machine=measured["machine"], figures=measured["figures"], figure_errors=measured["errors"]
                )
        print(f"gpu-check: {step} {results['steps'][step]['status']}", flush=True)
    md_path, json_path = write_report(results, args.out)
    print(open(md_path).read())
    print(f"gpu-check: report in {md_path} and {json_path}")
    return overall_exit(results)


if __name__ == "__main__":
    sys.exit(main())
