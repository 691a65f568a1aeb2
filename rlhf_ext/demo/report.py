"""The demo's report folder: `metrics.jsonl` (every stage's records, tagged with the stage), the curves
PNG, `samples.md` and `summary.json`."""

import json
import math
import os
import time
from typing import Optional

from transformers import TrainerCallback


class MetricsLog:
    """Appends {"stage", "step", "time", ...} records to <output_dir>/metrics.jsonl; `time` is seconds
    since the demo started."""

    def __init__(self, path: str, start_time: float):
        self.path = path
        self.start_time = start_time
        self.records = []
        with open(path, "w"):  # a fresh file per run
            pass

    def write(self, stage: str, step: Optional[int] = None, **values):
        record = {"stage": stage, "step": step, "time": round(time.perf_counter() - self.start_time, 3), **values}
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def of(self, stage: str) -> list:
        return [r for r in self.records if r["stage"] == stage]

    def callback(self, stage: str) -> TrainerCallback:
        """A `transformers.TrainerCallback` that copies a trainer's logs here under `stage`."""
        log = self

        class StageLogger(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                log.write(stage, state.global_step, **(logs or {}))

        return StageLogger()


def plot_curves(path: str, ppo_steps: list, tracked: list, title: str):
    """Three panels over PPO steps: reward-model score, KL to the reference, hidden true score.

    ppo_steps: the PPO trainer's per-step logs (objective/scores, objective/kl on its training batches);
    tracked: the demo's held-out tracking records (rm_score, kl, true_score on fixed prompts and seed);
    step 0 is the SFT policy itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    steps = [r["step"] for r in ppo_steps]
    t_steps = [r["step"] for r in tracked]
    panels = [
        ("Reward-model score", "objective/scores", "rm_score"),
        ("KL to the SFT reference (per sequence)", "objective/kl", "kl"),
        ("Hidden true score (never seen in training)", None, "true_score"),
    ]
    for ax, (name, train_key, track_key) in zip(axes, panels):
        if train_key is not None:
            ax.plot(
                steps,
                [r.get(train_key, math.nan) for r in ppo_steps],
                color="tab:blue",
                alpha=0.45,
                lw=1,
                label="PPO training batches",
            )
        ax.plot(
            t_steps,
            [r[track_key] for r in tracked],
            color="tab:red",
            marker="o",
            ms=3,
            lw=1.6,
            label="held-out prompts",
        )
        if t_steps and t_steps[0] == 0:
            ax.annotate("SFT", (0, tracked[0][track_key]), textcoords="offset points", xytext=(6, -4), fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_samples(path: str, sft: list, ppo: list, count: int = 12):
    """Markdown table of the first `count` held-out prompts: the SFT and the PPO completion for each."""

    def cell(text):
        return text.replace("|", "\\|").strip() or "(empty)"

    lines = [
        "# Before / after: SFT policy vs PPO policy",
        "",
        "Same held-out prompts; completions sampled at temperature 1. `true` is the hidden judge's score "
        "(+1 per positive word, -1 per negative word, -1 if the review rambles past twelve words or has no full "
        "stop); `rm` is the learned reward model's score, which PPO optimised.",
        "",
        "| prompt | SFT completion | true | rm | PPO completion | true | rm |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for a, b in list(zip(sft, ppo))[:count]:
        lines.append(
            f"| {cell(a['prompt'])} | {cell(a['completion'])} | {a['true_score']:+.0f} | {a['rm_score']:.2f} "
            f"| {cell(b['completion'])} | {b['true_score']:+.0f} | {b['rm_score']:.2f} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_summary(path: str, summary: dict):
    def clean(value):  # JSON has no NaN/inf: write them as null
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(clean(summary), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
