"""What the trainer and CLI tests share: reward functions, config builders, model tweaks, CLI config files (the
CLI's `workspace` fixture is in conftest.py). Test modules import from here, never from one another."""

import fnmatch

import torch
import yaml
from torch import nn

from rlhf_ext import GRPOConfig, PPOConfig, PPOTrainer, SFTConfig, SFTTrainer
from rlhf_ext.generation import left_pad
from rlhf_ext.models import position_ids_from_mask

TARGET = list(range(100, 120))  # 20 of ~380 token ids: ~5% of a random policy's samples


def target_fraction(prompts, completions, completion_ids, **columns):
    """The fraction of a completion's tokens in TARGET: a reward PPO and GRPO can raise within a few steps."""
    return [sum(t in TARGET for t in ids) / len(ids) for ids in completion_ids]


def target_ppo(args, tokenizer, model, **kwargs) -> PPOTrainer:
    """A PPOTrainer rewarded by `target_fraction` alone; kwargs go to PPOTrainer (train_dataset, eval_dataset, ...)."""
    return PPOTrainer(args, tokenizer, model, reward_funcs=[target_fraction], **kwargs)


def eos_biased(model, tokenizer, bias=4.0):
    """Untie the LM head and give it a bias towards EOS, so short rollouts contain finished rows."""
    emb = model.get_input_embeddings().weight
    head = nn.Linear(emb.shape[1], emb.shape[0], bias=True)
    head.weight.data.copy_(emb.data)
    head.bias.data.zero_()
    head.bias.data[tokenizer.eos_token_id] = bias
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model


def next_token_mass(model, tokenizer, rows, tokens) -> float:
    """The policy's mean next-token probability of `tokens` after each row's prompt."""
    ids, mask = left_pad([tokenizer(r["prompt"])["input_ids"] for r in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
    return float(logits.softmax(-1)[:, tokens].sum(-1).mean())


# What the small PPO and GRPO runs of the tests share: 2 steps at 1e-3, a log entry per step, no checkpoints.
SMALL_RUN = dict(max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no")


def ppo_args(cpu_args, **overrides):
    # a step: 4 x 2 = 8 prompts (16 with per_device_train_batch_size=8) in 2 minibatches
    base = dict(
        SMALL_RUN,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=2,
        num_ppo_epochs=2,
        response_length=6,
        temperature=1.0,
        num_sample_generations=0,
    )
    base.update(overrides)
    return PPOConfig(**base, **cpu_args)


def sft_trainer(make_lm, tokenizer, corpus, out, callbacks=None, **overrides) -> SFTTrainer:
    """The checkpoint tests' SFT run: 4 steps of 4 rows of corpus[:32], checkpoints every 2 steps in `out`."""
    settings = dict(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    rows = [{"text": t} for t in corpus[:32]]
    return SFTTrainer(
        make_lm(), SFTConfig(**settings), train_dataset=rows, processing_class=tokenizer, callbacks=callbacks
    )


def grpo_args(cpu_args, cls=GRPOConfig, **overrides):
    base = dict(SMALL_RUN, per_device_train_batch_size=8, num_generations=4, max_completion_length=6)
    base.update(overrides)
    return cls(**base, **cpu_args)


def rows_for(trainer, prompts: int):
    """The first `prompts` training prompts, each repeated num_generations times (one generation round's layout)."""
    G = trainer.args.num_generations
    return trainer.train_dataset[[i for i in range(prompts) for _ in range(G)]]


def write_config(path, **values):
    with open(path, "w") as fh:
        yaml.safe_dump(values, fh)
    return str(path)


def assert_declared_metrics(trainer, logs: list):
    """Every key a trainer logged at a training step is one it declares in `metric_keys` ("*": a source name)."""
    logged = {k for entry in logs if "learning_rate" in entry for k in entry}  # the training steps' entries
    logged -= {"step", "epoch"}
    undeclared = sorted(k for k in logged if not any(fnmatch.fnmatchcase(k, p) for p in trainer.metric_keys))
    assert not undeclared, f"{type(trainer).__name__} logs {undeclared}, which its metric_keys do not declare"
