"""GRPOTrainer / RLOOTrainer / REINFORCE++ on tiny real models."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from rlhf_ext import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from rlhf_ext.models import position_ids_from_mask
from rlhf_ext.ops.reference import masked_whiten_reference
from rlhf_ext.trainers.advantages import group_advantages, rloo_advantages
from rlhf_ext.trainers.experience import policy_logprobs
from tests.trainer_helpers import (
    assert_declared_metrics,
    eos_biased,
    grpo_args,
    next_token_mass,
    rows_for,
    target_fraction,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TRL_METRICS = [
    "reward",
    "reward_std",
    "rewards/low_fraction/mean",
    "rewards/low_fraction/std",
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "loss",
    "grad_norm",
    "learning_rate",
]


def length_reward(prompts, completions, completion_ids, **columns):
    return [len(ids) / 6 for ids in completion_ids]


LOW = list(range(7, 100))  # a quarter of the vocabulary: ~24% of a random policy's next-token mass


def low_fraction(prompts, completions, completion_ids, **columns):
    return [sum(t in LOW for t in ids) / len(ids) for ids in completion_ids]


def test_grpo_raises_a_learnable_reward(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    args = grpo_args(
        cpu_args,
        max_steps=10,
        per_device_train_batch_size=16,
        learning_rate=5e-2,
        beta=0.02,
        lr_scheduler_type="constant",
        max_completion_length=8,
    )
    trainer = GRPOTrainer(
        make_lm(), [low_fraction], args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
    )
    before = next_token_mass(trainer.policy, tiny_tokenizer, prompt_rows, LOW)
    logs = trainer.train().log_history
    after = next_token_mass(trainer.policy, tiny_tokenizer, prompt_rows, LOW)
    assert after > 1.8 * before, (before, after)  # 2.5x-4x for seeds 0-3 and 42
    rewards = [h["reward"] for h in logs]
    assert sum(rewards[-3:]) > 1.5 * sum(rewards[:3]), rewards
    assert next_token_mass(trainer.ref_model, tiny_tokenizer, prompt_rows, LOW) == pytest.approx(before, abs=1e-6)
    assert set(TRL_METRICS) <= set(logs[0]), set(TRL_METRICS) - set(logs[0])
    assert_declared_metrics(trainer, logs)
    assert all(math.isfinite(logs[-1][k]) for k in TRL_METRICS)
    assert logs[-1]["kl"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_types_match_trl_formulas(loss_type, make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    """The gradient of one optimizer step (2 micro-batches, some rows masked as truncated, ratios away from 1)
    equals the gradient of TRL's loss for that loss_type written out in plain PyTorch over the whole batch."""
    args = grpo_args(
        cpu_args,
        loss_type=loss_type,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        beta=0.1,
        epsilon_high=0.28,
        mask_truncated_completions=True,
        max_completion_length=10,
    )
    policy = eos_biased(make_lm(), tiny_tokenizer, bias=3.0)
    trainer = GRPOTrainer(
        policy, [length_reward], args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
    )
    exp, _ = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
    assert exp.finished.any() and (~exp.finished).any()
    noise = torch.randn(exp.loss_mask.shape, generator=torch.Generator().manual_seed(0))
    exp.old_logprobs = (
        policy_logprobs(trainer.policy, exp.sequences, exp.attention_mask, exp.prompt_length, args).detach()
        + 0.3 * noise
    ) * (exp.response_lengths[:, None] > torch.arange(exp.loss_mask.shape[1]))

    grads = {}
    trainer.clip_and_step = lambda params: grads.update({id(p): p.grad.clone() for p in params}) or 0.0
    trainer.update(exp, 0)
    trainer.policy.zero_grad()

    P, T = exp.prompt_length, args.temperature
    position_ids = position_ids_from_mask(exp.attention_mask)
    logits = trainer.policy(
        input_ids=exp.sequences, attention_mask=exp.attention_mask, position_ids=position_ids
    ).logits[:, P - 1 : -1]
    logp = F.log_softmax(logits.float() / T, -1).gather(-1, exp.sequences[:, P:, None])[..., 0]
    ratio = torch.exp(logp - exp.old_logprobs)
    A = exp.advantages
    per_token = -torch.min(ratio * A, ratio.clamp(1 - 0.2, 1 + 0.28) * A)
    d = exp.ref_logprobs - logp
    per_token = per_token + 0.1 * (torch.expm1(d) - d)  # k3 without the exp(d) - 1 cancellation
    m = exp.loss_mask
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = sum((per_token[h] * m[h]).sum() / m[h].sum().clamp(min=1) for h in (slice(0, 4), slice(4, 8))) / 2
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum()
    else:
        loss = (per_token * m).sum() / (m.shape[0] * args.max_completion_length)
    loss.backward()
    for p in trainer.policy.parameters():
        torch.testing.assert_close(grads[id(p)], p.grad, rtol=1e-4, atol=1e-6)


def only_long(prompts, completions, completion_ids, **columns):
    return [float(len(ids)) if len(ids) > 4 else None for ids in completion_ids]


def only_short(prompts, completions, completion_ids, **columns):
    return [1.0 if len(ids) <= 4 else None for ids in completion_ids]


def never(prompts, completions, **columns):
    return [None] * len(completions)


def test_reward_functions_returning_none(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    """None means "not applicable": NaN per function, left out of its mean/std, 0 in the weighted sum."""
    args = grpo_args(cpu_args, reward_weights=[1.0, 0.5, 2.0], max_completion_length=10, scale_rewards=True)
    assert args.scale_rewards == "group"
    policy = eos_biased(make_lm(), tiny_tokenizer, bias=3.0)
    trainer = GRPOTrainer(
        policy, [only_long, only_short, never], args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
    )
    exp, metrics = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
    lengths = exp.response_lengths.tolist()
    assert min(lengths) <= 4 < max(lengths)
    expected = torch.tensor([float(n) if n > 4 else 0.5 for n in lengths])
    torch.testing.assert_close(exp.scores.cpu(), expected)
    longs = torch.tensor([float(n) for n in lengths if n > 4])
    assert metrics["rewards/only_long/mean"] == pytest.approx(float(longs.mean()))
    assert metrics["rewards/only_short/mean"] == pytest.approx(1.0)
    assert math.isnan(metrics["rewards/never/mean"])
    torch.testing.assert_close(exp.advantages[:, 0], group_advantages(expected, 4, "group"))


def test_rloo_folds_sequence_kl_into_the_reward(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    args = grpo_args(cpu_args, cls=RLOOConfig, num_generations=4, beta=0.5)
    assert args.advantage_estimator == "rloo"
    trainer = RLOOTrainer(
        make_lm(), target_fraction, args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
    )
    trainer.policy.lm_head.weight.data.add_(0.05)  # move the policy away from the reference: KL > 0
    exp, _ = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
    response = (exp.response_lengths[:, None] > torch.arange(exp.loss_mask.shape[1])).float()
    seq_kl = ((exp.old_logprobs - exp.ref_logprobs) * response).sum(1)
    assert seq_kl.abs().max() > 0
    expected = rloo_advantages(exp.scores - 0.5 * seq_kl, 4)
    torch.testing.assert_close(exp.advantages, expected[:, None] * response)
    logs = trainer.train().log_history
    assert "kl" in logs[0] and math.isfinite(logs[-1]["loss"])


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_whitens_token_returns_over_the_batch(estimator, make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    args = grpo_args(cpu_args, advantage_estimator=estimator, beta=0.2, max_completion_length=10)
    trainer = GRPOTrainer(
        eos_biased(make_lm(), tiny_tokenizer, bias=3.0),
        [length_reward],
        args=args,
        train_dataset=prompt_rows,
        processing_class=tiny_tokenizer,
    )
    trainer.policy.lm_head.weight.data.add_(0.05)
    exp, _ = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
    mask = (exp.response_lengths[:, None] > torch.arange(exp.loss_mask.shape[1])).float()
    scores = exp.scores.clone()
    if estimator == "reinforce_pp_baseline":
        scores = scores - scores.view(-1, 4).mean(1).repeat_interleave(4)
    token_rewards = -0.2 * (exp.old_logprobs - exp.ref_logprobs) * mask
    token_rewards[torch.arange(8), exp.response_lengths - 1] += scores
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(exp.advantages, masked_whiten_reference(returns, mask), rtol=1e-4, atol=1e-5)


def test_mid_round_checkpoint_resumes_exactly(make_lm, tiny_tokenizer, prompt_rows, cpu_args, tmp_path):
    """num_iterations=2: step 1 ends mid generation round, so its checkpoint carries the round's samples."""

    def run(output_dir, max_steps, resume=None, save_steps=500):
        args = grpo_args(
            {**cpu_args, "output_dir": str(output_dir)},
            max_steps=max_steps,
            num_iterations=2,
            beta=0.05,
            save_strategy="steps",
            save_steps=save_steps,
            lr_scheduler_type="constant",
        )
        trainer = GRPOTrainer(
            make_lm(), [target_fraction], args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 3)
    run(tmp_path / "cut", 1, save_steps=1)
    assert os.path.exists(tmp_path / "cut" / "checkpoint-1" / "rollout_buffer.pt")
    resumed = run(tmp_path / "cut", 3, resume=str(tmp_path / "cut" / "checkpoint-1"))
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_log_completions_and_eval(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    args = grpo_args(
        cpu_args,
        max_steps=1,
        log_completions=True,
        num_completions_to_print=2,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
    )
    trainer = GRPOTrainer(
        make_lm(),
        [target_fraction],
        args=args,
        train_dataset=prompt_rows,
        eval_dataset=prompt_rows[:3],
        processing_class=tiny_tokenizer,
    )
    logs = trainer.train().log_history
    assert any("eval_reward" in h and "eval_completions/mean_length" in h for h in logs)
    lines = [json.loads(line) for line in open(os.path.join(args.output_dir, "completions.jsonl"))]
    assert len(lines) == 8 and {"step", "prompt", "completion", "reward"} <= set(lines[0])


def wrong_length(prompts, completions, **columns):
    return [0.0] * (len(completions) + 1)


def test_bad_inputs_give_clear_errors(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    trainer = GRPOTrainer(
        make_lm(), [wrong_length], args=grpo_args(cpu_args), train_dataset=prompt_rows, processing_class=tiny_tokenizer
    )
    with pytest.raises(ValueError, match="reward function 'wrong_length': returned 9 rewards for 8 completions"):
        trainer.train()
    with pytest.raises(
        ValueError, match=r"num_generations: 4 does not divide the generation batch of 6 .*one of \[2, 3, 6\]"
    ):
        grpo_args(cpu_args, per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="use_vllm: True is not supported"):
        grpo_args(cpu_args, use_vllm=True)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_args(cpu_args, importance_sampling_level="sequence")
    for field, value in (
        ("loss_type", "ppo"),
        ("scale_rewards", "rows"),
        ("num_generations", 1),
        ("epsilon", 0.0),
        ("advantage_estimator", "gae"),
        ("steps_per_generation", 3),
    ):
        with pytest.raises(ValueError, match=f"GRPOConfig.{field}"):
            grpo_args(cpu_args, gradient_accumulation_steps=2, per_device_train_batch_size=4, **{field: value})
    with pytest.raises(ValueError, match="reward_funcs: required"):
        GRPOTrainer(make_lm(), [], args=grpo_args(cpu_args), train_dataset=prompt_rows, processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="'prompt' column"):
        GRPOTrainer(
            make_lm(),
            [length_reward],
            args=grpo_args(cpu_args),
            train_dataset=[{"text": "x"}],
            processing_class=tiny_tokenizer,
        )


def test_cli_trains_grpo_with_lora(make_lm, tiny_tokenizer, prompt_rows, tmp_path):
    from rlhf_ext.cli import main

    make_lm().save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    with open(tmp_path / "prompts.jsonl", "w") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in prompt_rows[:16])
    (tmp_path / "my_rewards.py").write_text(
        "def count_low(prompts, completions, completion_ids, **kw):\n"
        "    return [sum(t < 100 for t in ids) / len(ids) for ids in completion_ids]\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "grpo",
                "--model_name_or_path",
                str(tmp_path / "policy"),
                "--dataset_name",
                str(tmp_path / "prompts.jsonl"),
                "--reward_funcs",
                f"{tmp_path / 'my_rewards.py'}:count_low",
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "8",
                "--num_generations",
                "4",
                "--max_completion_length",
                "4",
                "--use_cpu",
                "--disable_tqdm",
                "--save_strategy",
                "no",
                "--logging_steps",
                "1",
                "--beta",
                "0.1",
                "--use_peft",
                "--lora_r",
                "4",
                "--lora_target_modules",
                "q_proj,v_proj",
            ]
        )
        == 0
    )
    assert os.path.exists(out / "adapter_config.json")
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and "rewards/count_low/mean" in records[0] and "kl" in records[0]


def test_trl_style_argument_parser_builds_grpo_config(tmp_path):
    """TRL's GRPO scripts build their config with HfArgumentParser, which hands every field's metadata to
    argparse: nothing but argparse keywords may be there."""
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--num_generations", "4", "--use_cpu", "True"]
    )
    assert config.num_generations == 4
    with pytest.raises(ValueError, match="use_vllm: True is not supported by GRPOConfig"):
        HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
            args=["--output_dir", str(tmp_path), "--use_vllm", "True", "--use_cpu", "True"]
        )
