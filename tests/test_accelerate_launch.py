"""`accelerate launch --config_file <yaml>` end to end on CPU: the shipped FSDP and data-parallel configs run
examples/multi_process_grpo.py on 2 gloo processes; the FSDP run holds half the weights per rank and its saved
model is a plain Hugging Face checkpoint."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(config: str, out, *launch_args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in list(env):  # nothing from the calling shell may change what the config asks for
        if name.startswith(("FSDP_", "ACCELERATE_")):
            del env[name]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(ROOT, "examples", "accelerate", config),
        *launch_args,
        os.path.join(ROOT, "examples", "multi_process_grpo.py"),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--prompts_per_process",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "summary.json") as fh:
        return json.load(fh)


@pytest.mark.parametrize(
    "config, launch_args, fsdp, held",
    [
        ("fsdp.yaml", (), True, 0.5),
        ("fsdp.yaml", ("--mixed_precision", "bf16"), True, 0.5),  # accelerate's mixed precision reaches the trainer
        ("ddp.yaml", (), False, 1.0),
    ],
)
def test_accelerate_launch_with_the_shipped_configs(tmp_path, config, launch_args, fsdp, held):
    from transformers import AutoModelForCausalLM

    summary = launch(config, tmp_path, *launch_args)
    assert summary["processes"] == 2 and summary["fsdp"] is fsdp
    assert summary["bf16"] is ("bf16" in launch_args)
    assert summary["held_fraction"] == pytest.approx(held, abs=0.01)
    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    assert len(lines) == 3  # rank 0 alone logs
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # full weights, loadable without FSDP
    assert all(p.isfinite().all() for p in model.parameters())
