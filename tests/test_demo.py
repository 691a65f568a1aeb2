"""`rlhf-ext demo`: the end-to-end test of the product. `--quick` runs every stage (SFT, pairs, reward
model, PPO, evaluation) at a reduced size; the full demo, with its targets, is marked slow."""

import json
import math

import pytest

from rlhf_ext.cli import main
from rlhf_ext.demo import pipeline, task
from rlhf_ext.demo.sampling import win_rate

HEADLINE = ("win_rate_vs_sft", "true_score_sft", "true_score_ppo", "kl_to_ref", "reward_model_accuracy", "wall_seconds")
TAGS = {"sft", "pairs", "reward", "reward_eval", "ppo", "ppo_track", "eval"}


def read_report(folder):
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, records


def check_report(folder, sizes):
    summary, records = read_report(folder)
    for key in HEADLINE:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (key, summary[key])
    assert summary["stage_ok"] == {name: True for name in pipeline.STAGES}
    assert set(summary["stage_seconds"]) == set(pipeline.STAGES) and summary["error"] is None
    assert 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    assert summary["wins"] + summary["ties"] + summary["losses"] == pytest.approx(1.0)
    assert summary["win_rate_vs_sft"] == pytest.approx(summary["wins"] + 0.5 * summary["ties"])
    for key in ("reward_model_accuracy", "reward_model_accuracy_true", "annotator_agreement_with_true"):
        assert 0.0 <= summary[key] <= 1.0, key
    # the SFT policy is the reference: its own KL estimate is exactly zero
    assert summary["kl_sft_to_ref"] == 0.0
    assert summary["eval_comparisons"] == sizes.eval_prompts * sizes.eval_samples_per_prompt
    assert summary["ppo_steps"] == sizes.ppo_steps and summary["sft_steps"] > 0
    assert summary["ppo_prompts_per_step"] == sizes.ppo_micro_batch * sizes.ppo_mini_batches
    assert summary["wall_seconds"] >= sum(summary["stage_seconds"].values()) - 1e-6

    # metrics.jsonl: every stage's records, tagged
    assert TAGS <= {r["stage"] for r in records}
    ppo_steps = [r["step"] for r in records if r["stage"] == "ppo"]
    assert ppo_steps == list(range(1, sizes.ppo_steps + 1))
    tracked = [r for r in records if r["stage"] == "ppo_track"]
    assert tracked[0]["step"] == 0 and tracked[0]["kl"] == 0.0 and tracked[-1]["step"] == sizes.ppo_steps
    assert all(math.isfinite(r[k]) for r in tracked for k in ("true_score", "rm_score", "kl"))

    png = (folder / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    samples = (folder / "samples.md").read_text()
    assert samples.count("\n| review :") == min(12, summary["eval_comparisons"])
    for stage in ("sft", "reward", "ppo", "ppo/critic"):
        assert (folder / stage / "config.json").is_file() and (folder / stage / "model.safetensors").is_file(), stage
    for stage in ("sft", "reward", "ppo"):
        assert (folder / stage / "tokenizer.json").is_file(), stage
    return summary


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--output-dir", str(out), "--seed", "3"]) == 0
    summary = check_report(out, pipeline.QUICK)
    assert summary["quick"] is True and summary["seed"] == 3
    assert "win rate vs SFT" in capsys.readouterr().out
    # the SFT policy learned the corpus's form: it ends its reviews with EOS
    assert summary["eos_fraction_sft"] > 0.5


def test_failed_stage_is_reported_and_raised(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("pairs went wrong")

    monkeypatch.setattr(pipeline.Demo, "sft", lambda self: None)
    monkeypatch.setattr(pipeline.Demo, "pairs", broken)
    with pytest.raises(RuntimeError, match="pairs went wrong"):
        pipeline.run_demo(str(tmp_path), quick=True)
    summary, _ = read_report(tmp_path)
    assert summary["stage_ok"] == {"sft": True, "pairs": False, "reward": False, "ppo": False, "eval": False}
    assert "pairs went wrong" in summary["error"] and summary["win_rate_vs_sft"] is None


def test_cli_refuses_bad_threads(tmp_path):
    with pytest.raises(SystemExit, match="--threads"):
        main(["demo", "--quick", "--threads", "0", "--output-dir", str(tmp_path)])


def test_win_rate_counts_ties_half():
    def rows(*completions):
        return [{"prompt": "p", "completion": c, "true_score": task.true_score(c)} for c in completions]

    ppo = rows(" great .", " great .", " fine .", " awful .")
    sft = rows(" awful .", " okay .", " okay .", " great .")  # win, win, tie, loss
    assert win_rate(ppo, sft) == {"win_rate": 0.5 + 0.5 * 0.25, "wins": 0.5, "ties": 0.25, "losses": 0.25}
    with pytest.raises(ValueError, match="aligned"):
        win_rate(ppo, [{**sft[0], "prompt": "other"}] + sft[1:])
    with pytest.raises(ValueError, match="as many"):
        win_rate(ppo, sft[:2])


def test_true_score_is_the_documented_judge():
    assert task.true_score(" great and the soup was lovely .") == 2.0
    assert task.true_score(" great and the soup was awful .") == 0.0
    assert task.true_score(" great") == 0.0  # no full stop: -1
    rambling = " great and the soup was lovely also the tea was warm and the cake was fresh ."
    assert task.true_score(rambling) == 4.0 - 1.0


@pytest.mark.slow
def test_full_demo_meets_its_targets(tmp_path):
    summary = pipeline.run_demo(str(tmp_path), seed=0)
    check_report(tmp_path, pipeline.FULL)
    assert summary["win_rate_vs_sft"] >= 0.75
    assert summary["true_score_ppo"] > summary["true_score_sft"]
    assert 0.0 < summary["kl_to_ref"] < 10.0  # the leash holds: a few nats per review
    assert summary["reward_model_accuracy_true"] > 0.8


@pytest.mark.slow
def test_demo_is_seed_fixed(tmp_path):
    def figures(folder):
        summary = pipeline.run_demo(str(tmp_path / folder), seed=1, quick=True)
        return {k: v for k, v in summary.items() if k not in ("wall_seconds", "stage_seconds")}

    assert figures("a") == figures("b")
