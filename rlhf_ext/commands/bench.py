"""`rlhf-ext bench`: a quick kernel summary — each fused op against the plain PyTorch it replaces,
at one representative shape, on this machine. The full sweeps live in benchmarks/ (pytest-benchmark).

Each op module may define `bench_cases()` returning a list of `(name, shape, op_fn, baseline_fn)`;
both functions take no argument and run one call."""

import importlib
import sys
import time

OP_MODULES = ["gae", "whiten", "logprobs", "ppo_loss", "sampling", "packed_linear", "decode_step"]


def register(subparsers):
    p = subparsers.add_parser("bench", help="time every fused op against its plain-PyTorch baseline")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (the median is shown)")
    p.add_argument("--only", default=None, help="comma-separated op modules to run (default: all)")
    p.set_defaults(func=run)


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: first-call allocation and dispatch caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def run(args) -> int:
    import torch

    import rlhf_ext  # noqa: F401  (loads the kernels)

    wanted = [name.strip() for name in args.only.split(",")] if args.only else OP_MODULES
    unknown = [name for name in wanted if name not in OP_MODULES]
    if unknown or isinstance(args.repeat, bool) or args.repeat < 1:
        what = f"--only: expected op modules among {','.join(OP_MODULES)}, got {','.join(unknown)!r}"
        if not unknown:
            what = f"--repeat: expected an int >= 1, got {args.repeat}"
        print(f"rlhf-ext bench: {what}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeat} calls")
    print(f"{'op':<28} {'shape':<26} {'fused ms':>10} {'baseline ms':>12} {'speedup':>8}")
    for name in wanted:
        module = importlib.import_module(f"rlhf_ext.ops.{name}")
        for case, shape, op_fn, base_fn in getattr(module, "bench_cases", lambda: [])():
            with torch.no_grad() if case.endswith("fwd") else torch.enable_grad():
                fused = _median_seconds(op_fn, args.repeat)
                base = _median_seconds(base_fn, args.repeat)
            print(f"{case:<28} {shape:<26} {fused * 1e3:>10.2f} {base * 1e3:>12.2f} {base / fused:>7.1f}x")
    return 0
