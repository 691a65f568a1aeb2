"""What the example scripts share: their command line and the start of a training run. Each script runs as
`python examples/<name>.py` (this folder is then on sys.path), and the tests load them the same way."""

import argparse
import os
import tempfile

import torch


def parse_command_line(doc: str, quick_help: str, output_dir: bool = True, **more) -> argparse.Namespace:
    """--quick, --seed and (with output_dir) --output_dir; `more`: further options, name -> add_argument kwargs."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    for name, kwargs in more.items():
        parser.add_argument(f"--{name}", **kwargs)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--seed", type=int, default=0)
    if output_dir:
        parser.add_argument("--output_dir", default=None, help="where the trainers write (default: a temporary folder)")
    return parser.parse_args()


def before_after(before: dict, after: dict, formats: dict) -> str:
    """Each metric of `formats` (name -> format spec) as "name <before> -> <after>", comma-separated: e.g.
    "success 41.0% -> 92.0%, turns 3.31 -> 2.62" for {"success": ".1%", "turns": ".2f"}."""
    return ", ".join(f"{name} {before[name]:{spec}} -> {after[name]:{spec}}" for name, spec in formats.items())


def start_run(seed: int, output_dir, prefix: str) -> tuple:
    """(output_dir, the trainer arguments every stage shares): a temporary folder unless one is given, at most 4
    torch threads, every generator seeded with `seed`."""
    from transformers import set_seed

    output_dir = output_dir or tempfile.mkdtemp(prefix=prefix)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    set_seed(seed)
    common = dict(use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", seed=seed, logging_steps=10)
    return output_dir, common


def train_sft(model, tokenizer, rows: list, output_dir: str, common: dict, **config):
    """An SFTTrainer over `rows` (writing to <output_dir>/sft, constant learning rate, `config` on top), trained."""
    from rlhf_ext import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=os.path.join(output_dir, "sft"), lr_scheduler_type="constant", **config, **common)
    sft = SFTTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer)
    sft.train()
    return sft


def grpo_config(output_dir: str, common: dict, *, prompts: int, generations: int, **config):
    """The examples' GRPOConfig (writing to <output_dir>/grpo): `prompts` x `generations` completions a step, no KL
    term, temperature 1, constant learning rate, `config` on top."""
    from rlhf_ext import GRPOConfig

    return GRPOConfig(
        output_dir=os.path.join(output_dir, "grpo"),
        num_generations=generations,
        per_device_train_batch_size=prompts * generations,
        lr_scheduler_type="constant",
        beta=0.0,
        temperature=1.0,
        **config,
        **common,
    )
