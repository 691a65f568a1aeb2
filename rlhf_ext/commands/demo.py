"""`rlhf-ext demo [--output-dir DIR] [--seed N] [--quick]`: the whole RLHF pipeline on embedded defaults
(SFT -> preference pairs -> reward model -> PPO -> evaluation by a hidden judge). See rlhf_ext.demo.pipeline."""

import argparse


def register(subparsers):
    p = subparsers.add_parser(
        "demo",
        help="run the whole RLHF pipeline on a toy task and judge it with a hidden true preference",
        description="SFT a tiny Llama on generated restaurant reviews, sample preference pairs and label them with a "
        "noisy simulated annotator, train a reward model, run PPO against it, and evaluate SFT vs PPO "
        "with the hidden true score that neither the reward model nor PPO ever saw. Writes metrics.jsonl, "
        "curves.png, samples.md, summary.json and the HF checkpoints (sft/, reward/, ppo/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", default="demo_output", help="report folder (created; files in it are overwritten)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage (data, models, sampling, annotator)")
    p.add_argument("--quick", action="store_true", help="reduced sizes that still run every stage (a smoke test)")
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (the demo's models are tiny: more threads only add overhead)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    if args.threads < 1:
        raise SystemExit(f"--threads: expected an integer >= 1, got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device!r}: torch sees no CUDA GPU")
    from rlhf_ext.demo.pipeline import run_demo

    summary = run_demo(args.output_dir, seed=args.seed, quick=args.quick, device=args.device, threads=args.threads)
    print(
        f"win rate vs SFT {summary['win_rate_vs_sft']:.3f} | true score {summary['true_score_sft']:+.2f} -> "
        f"{summary['true_score_ppo']:+.2f} | KL to ref {summary['kl_to_ref']:.2f} | reward-model accuracy "
        f"{summary['reward_model_accuracy']:.3f} | {summary['wall_seconds']:.0f}s"
    )
    return 0
