"""GRPO on several processes: data parallel or FSDP-sharded, launched by torchrun or accelerate.

A tiny Llama (built locally, nothing downloaded) learns to emit tokens of a fixed target set (ids 7-99,
about a quarter of a random policy's samples) under a rule reward. The same script runs in one process or many;
what the launcher's environment says decides:

    python examples/multi_process_grpo.py                                  # one process
    torchrun --nproc_per_node 2 examples/multi_process_grpo.py             # data parallel (gloo on CPU)
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/multi_process_grpo.py
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/multi_process_grpo.py

Rank 0 prints the mean reward of the first and last steps and the share of the policy's weights it holds
(1.0 data parallel, about 1/N under FSDP), and saves the policy (full HF weights) to --output_dir.
One process, seed 0, 10 steps: reward 0.27 -> 0.93; 2 processes (DDP or FSDP), 8 prompts a step: 0.25 -> 0.71.
"""

import argparse
import json
import os

import torch

from rlhf_ext import GRPOConfig, GRPOTrainer
from rlhf_ext.models.tiny import build_tokenizer, default_corpus, tiny_causal_lm

TARGET_IDS = set(range(7, 100))


def target_token_reward(prompts, completions, completion_ids, **columns):
    """Share of the completion's tokens that are in TARGET_IDS (a dense, checkable rule reward)."""
    return [sum(t in TARGET_IDS for t in ids) / max(1, len(ids)) for ids in completion_ids]


def held_fraction(model) -> float:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return held / sum(p.numel() for p in params)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="multi_process_grpo")
    parser.add_argument("--max_steps", type=int, default=10)
    parser.add_argument("--prompts_per_process", type=int, default=4)
    opts = parser.parse_args(argv)

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = tiny_causal_lm("llama", tokenizer=tok)
    prompts = [{"prompt": " ".join(line.split(" ")[:2])} for line in default_corpus(256, seed=1)[:128]]
    args = GRPOConfig(
        output_dir=opts.output_dir,
        use_cpu=not torch.cuda.is_available(),
        max_steps=opts.max_steps,
        seed=0,
        num_generations=4,
        per_device_train_batch_size=4 * opts.prompts_per_process,
        max_completion_length=8,
        learning_rate=5e-2,
        beta=0.02,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model, target_token_reward, args=args, train_dataset=prompts, processing_class=tok)
    state = trainer.train()
    trainer.save_model(opts.output_dir)
    fraction = held_fraction(trainer.policy)
    summary = {
        "processes": trainer.dist.world_size,
        "fsdp": trainer.fsdp is not None and trainer.dist.enabled,
        "bf16": trainer.args.bf16,
        "held_fraction": fraction,
        "first_reward": state.log_history[0]["reward"],
        "last_reward": state.log_history[-1]["reward"],
    }
    if trainer.dist.is_main:
        print(json.dumps(summary))
        with open(os.path.join(opts.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh)
    if torch.distributed.is_initialized():
        # Leave together and tear the process group down: a rank that exits while another still writes, with
        # its gloo group alive, can abort at interpreter exit, and the launcher then kills the others.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
