"""The GPU figures of `make gpu-check` (scripts/gpu_check.py), each against its eager PyTorch baseline from
rlhf_ext/ops/reference.py measured in the same run:

  logprobs   gather_logprobs fwd and fwd+bwd, N = 65536 rows, V = 128256, bf16 logits (16.8 GB), with the share
             of HBM bandwidth the fused kernels reach (bytes they must move / time / peak);
  sampler    sample with top-k 50 / top-p 0.9 at B = 256, V = 128256 (fp32 and bf16 logits);
  gae        B = 64, T = 4096 fp32; ppo_loss fwd and fwd+bwd at B = 64, T = 4096 (values, k3 KL, entropy on);
  rollout    tokens/s of rlhf_ext.generation.generate without and with the CUDA-graph decode step, and of HF
             `generate`, on the small Llama of benchmarks/bench_rollout.py (built from a config, no hub).

Timings are CUDA-event medians after warm-up. A baseline that does not fit in GPU memory at the full shape
is measured on a slice of rows and scaled linearly; the figure says so (`baseline_scaled_from`).
`python benchmarks/gpu_figures.py --json out.json [--quick]` (needs a CUDA GPU and the CUDA build).
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Peak HBM bandwidth (GB/s) by device name, for when the driver does not report clock and bus width.
SPEC_BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
}


def cuda_time_us(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median wall time of `fn()` on the GPU in microseconds (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_bandwidth_gbs() -> tuple:
    """(GB/s, where the number comes from): clock x bus width when torch exposes them, else the spec sheet."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width (double data rate)"
    for name, gbs in SPEC_BANDWIDTH_GBS.items():
        if name in props.name:
            return gbs, f"spec sheet ({name})"
    return float("nan"), "unknown device"


def copy_bandwidth_gbs(gigabytes: float = 4.0) -> float:
    """Device-to-device copy (bytes read + written per second): the bandwidth a streaming kernel can reach."""
    src = torch.empty(int(gigabytes * 1e9 / 2), dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), warmup=2, reps=5)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e9


def figure(name, shape, fused_us, baseline_us, baseline="reference", **extra) -> dict:
    out = {"name": name, "shape": shape, "fused_us": fused_us, "baseline": baseline, "baseline_us": baseline_us}
    out["speedup"] = baseline_us / fused_us if baseline_us and fused_us else None
    out.update(extra)
    return out


def baseline_us(make_fn, rows: int, min_rows: int = 1) -> tuple:
    """Time `make_fn(rows)()`; on out-of-memory halve the rows and scale the time up. (us, rows measured at)."""
    while rows >= min_rows:
        try:
            us = cuda_time_us(make_fn(rows), warmup=1, reps=3)
            return us, rows
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows //= 2
    return None, None


def logprobs_figures(N: int, V: int, peak_gbs: float) -> list:
    from rlhf_ext.ops import gather_logprobs
    from rlhf_ext.ops.reference import gather_logprobs_eager

    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    weights = torch.rand(N, device="cuda")
    leaf = logits.detach().requires_grad_()

    def fwd_bwd(fn, x, lab):
        def run():
            x.grad = None
            (fn(x, lab) * weights[: x.shape[0]]).sum().backward()

        return run

    fwd = cuda_time_us(lambda: gather_logprobs(logits, labels))
    both = cuda_time_us(fwd_bwd(gather_logprobs, leaf, labels))
    leaf.grad = None
    elem_bytes = logits.element_size() * N * V
    # Least traffic: the forward reads the logits once; the backward reads them again and writes the gradient.
    shape = f"N={N} V={V} bf16"
    fwd_gbs, both_gbs = elem_bytes / (fwd * 1e-6) / 1e9, 3 * elem_bytes / (both * 1e-6) / 1e9
    base_fwd, rows_fwd = baseline_us(lambda n: lambda: gather_logprobs_eager(logits[:n], labels[:n]), N)
    base_both, rows_both = baseline_us(
        lambda n: fwd_bwd(gather_logprobs_eager, logits[:n].detach().requires_grad_(), labels[:n]), N
    )
    del leaf
    torch.cuda.empty_cache()
    out = []
    for name, us, gbs, base, rows in (
        ("logprobs fwd", fwd, fwd_gbs, base_fwd, rows_fwd),
        ("logprobs fwd+bwd", both, both_gbs, base_both, rows_both),
    ):
        scaled = base * N / rows if base else None
        out.append(
            figure(
                name,
                shape,
                us,
                scaled,
                "gather_logprobs_eager",
                achieved_gbs=gbs,
                hbm_share=gbs / peak_gbs if peak_gbs == peak_gbs else None,
                baseline_scaled_from=None if rows == N else rows,
            )
        )
    return out


def sampler_figures(B: int, V: int) -> list:
    from rlhf_ext.ops import sample
    from rlhf_ext.ops.reference import sample_reference

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(B, V, device="cuda") * 4).to(dtype)
        fused = cuda_time_us(lambda: sample(logits, 1.0, top_k=50, top_p=0.9))
        base = cuda_time_us(lambda: sample_reference(logits, 1.0, top_k=50, top_p=0.9), reps=5)
        out.append(
            figure(
                "sampler top-k 50 / top-p 0.9",
                f"B={B} V={V} {str(dtype)[6:]}",
                fused,
                base,
                "sample_reference (sort + multinomial)",
            )
        )
    return out


def gae_ppo_figures(B: int, T: int) -> list:
    from benchmarks.bench_ppo_loss import _inputs
    from rlhf_ext.ops import gae, ppo_loss
    from rlhf_ext.ops.reference import gae_reference, ppo_loss_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    rewards, values = torch.randn(B, T, device="cuda", generator=g), torch.randn(B, T, device="cuda", generator=g)
    mask = torch.rand(B, T, device="cuda", generator=g) > 0.1
    fused = cuda_time_us(lambda: gae(rewards, values, mask, 0.99, 0.95))
    base = cuda_time_us(lambda: gae_reference(rewards, values, mask, 0.99, 0.95), warmup=1, reps=3)
    out = [figure("gae", f"B={B} T={T} fp32", fused, base, "gae_reference (reverse loop over T)")]
    tensors = {k: v.cuda() for k, v in _inputs(B, T, "cpu").items()}
    grads = ("logprobs", "values", "entropy")
    coefs = dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01)

    def run(fn, backward):
        leaves = {k: (v.detach().requires_grad_() if k in grads and backward else v) for k, v in tensors.items()}

        def call():
            loss = fn(**leaves, **coefs).loss
            if backward:
                loss.backward()

        return call

    for backward, name in ((False, "ppo_loss fwd"), (True, "ppo_loss fwd+bwd")):
        fused = cuda_time_us(run(ppo_loss, backward))
        base = cuda_time_us(run(ppo_loss_reference, backward))
        out.append(figure(name, f"B={B} T={T} fp32, values + k3 KL + entropy", fused, base, "ppo_loss_reference"))
    return out


def rollout_figures(quick: bool) -> list:
    from benchmarks import bench_rollout
    from rlhf_ext.generation import generate

    model, ids, mask = bench_rollout.build()
    model, ids, mask = model.cuda(), ids.cuda(), mask.cuda()
    B, new = ids.shape[0], bench_rollout.NEW
    kw = dict(max_new_tokens=new, temperature=1.0, top_k=50, top_p=0.9, pad_token_id=0)
    engines = {
        "generate, dynamic cache": lambda: generate(model, ids, mask, **kw),
        "generate, static cache + CUDA graph": lambda: generate(
            model, ids, mask, cache="static", cuda_graph=True, **kw
        ),
        "HF generate": lambda: model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            top_k=50,
            top_p=0.9,
        ),
    }
    rates = {}
    with torch.no_grad():
        for name, fn in engines.items():
            fn()  # warm-up (allocator, cuBLAS handles)
            best = 0.0
            for _ in range(1 if quick else 3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                best = max(best, B * new / (time.perf_counter() - start))
            rates[name] = best
    shape = (
        f"Llama {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, B={B} "
        f"P={ids.shape[1]} new={new} V={bench_rollout.VOCAB} fp32, top-k 50 / top-p 0.9"
    )
    hf = rates["HF generate"]
    return [
        figure(f"rollout: {name}", shape, None, None, "HF generate", tokens_per_s=rate, speedup_vs_hf=rate / hf)
        for name, rate in rates.items()
        if name != "HF generate"
    ] + [figure("rollout: HF generate", shape, None, None, "HF generate", tokens_per_s=hf, speedup_vs_hf=1.0)]


def collect(quick: bool = False) -> dict:
    """Every figure; `quick` shrinks the shapes (a smoke run of this file, not the reported numbers)."""
    import rlhf_ext  # noqa: F401  (loads the ops)

    props = torch.cuda.get_device_properties(0)
    peak, peak_source = peak_bandwidth_gbs()
    machine = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_hbm_gbs": peak,
        "peak_hbm_source": peak_source,
        "copy_gbs": copy_bandwidth_gbs(0.5 if quick else 4.0),
    }
    N, V, B_s, B, T = (1024, 128256, 16, 8, 512) if quick else (65536, 128256, 256, 64, 4096)
    figures, errors = [], {}
    for name, fn in (
        ("logprobs", lambda: logprobs_figures(N, V, peak)),
        ("sampler", lambda: sampler_figures(B_s, V)),
        ("gae/ppo_loss", lambda: gae_ppo_figures(B, T)),
        ("rollout", lambda: rollout_figures(quick)),
    ):
        try:
            figures += fn()
        except Exception as exc:  # one family failing must not hide the others' figures
            errors[name] = f"{type(exc).__name__}: {exc}"
        torch.cuda.empty_cache()
    return {"machine": machine, "figures": figures, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the figures")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_figures: no CUDA GPU visible; nothing measured", file=sys.stderr)
        return 2
    result = collect(args.quick)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
