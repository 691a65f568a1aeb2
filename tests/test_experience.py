"""rlhf_ext.trainers.experience: keyed sampling through the one completion path, and the Experience record."""

import dataclasses

import pytest
import torch

from rlhf_ext.generation import SamplingSettings, generate, left_pad
from rlhf_ext.trainers.experience import Experience, sample_completions
from tests.trainer_helpers import grpo_args, ppo_args, rows_for, target_fraction, target_ppo

pytestmark = pytest.mark.usefixtures("single_thread")


def rows_of(rollout, first, last):
    """Rows [first, last) of a rollout as (response ids up to each row's length, lengths), padding-independent."""
    lengths = rollout.response_lengths[first:last].tolist()
    return [ids[:n] for ids, n in zip(rollout.response_ids[first:last].tolist(), lengths)], lengths


def test_sampling_is_keyed_by_seed_step_and_row(make_lm, tiny_tokenizer, prompt_rows):
    policy = make_lm()
    prompts = [tiny_tokenizer(r["prompt"])["input_ids"] for r in prompt_rows[:6]]
    settings = SamplingSettings(
        max_new_tokens=5, pad_token_id=tiny_tokenizer.pad_token_id, stop_token_id=tiny_tokenizer.eos_token_id
    )
    whole = sample_completions(policy, prompts, settings, seed=3, step=2, chunk_size=2)
    # a process that holds global rows 2..5 of the step draws the same completions for them
    share = sample_completions(policy, prompts[2:], settings, seed=3, step=2, row_offset=2, chunk_size=2)
    assert rows_of(whole, 2, 6) == rows_of(share, 0, 4)
    # the chunk starting at global row 4 is what generate draws from the generator seeded with the row's key
    ids, mask = left_pad(prompts, settings.pad_token_id)
    generator = torch.Generator().manual_seed((3 * 1_000_003 + 2) * 1_000_033 + 4)
    direct = generate(
        policy,
        ids[4:6],
        mask[4:6],
        max_new_tokens=5,
        eos_token_id=settings.stop_token_id,
        pad_token_id=settings.pad_token_id,
        generator=generator,
    )
    assert rows_of(whole, 4, 6) == rows_of(direct, 0, 2)
    # another step (or seed) draws other completions
    other = sample_completions(policy, prompts, settings, seed=3, step=3, chunk_size=2)
    assert rows_of(other, 0, 6) != rows_of(whole, 0, 6)
    assert not policy.training  # sampled in eval mode (no dropout)


def test_experience_moves_every_tensor_and_counts_response_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    exp = Experience(
        sequences=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        prompt_length=2,
        response_mask=mask,
        loss_mask=mask,
        advantages=torch.zeros(2, 3),
        scores=torch.zeros(2),
        per_source=torch.zeros(2, 1),
        finished=torch.tensor([True, False]),
        time_rollout=1.5,
    )
    assert exp.response_lengths.tolist() == [2, 1] and exp.response_lengths.dtype == torch.int64
    moved = exp.to("meta")
    for field in dataclasses.fields(Experience):
        value = getattr(moved, field.name)
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", field.name
        else:
            assert value == getattr(exp, field.name), field.name


def _forward_counter(model):
    """The input shapes of every pass through the model (a hook on its input embeddings: whatever runs the
    backbone, HF's forward or the fused log-prob path, embeds its tokens first)."""
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    return calls


@pytest.mark.parametrize("shared_critic", [False, True])
def test_ppo_old_logprobs_from_the_sampler_equal_a_recomputed_forward(
    make_lm, tiny_tokenizer, prompt_rows, cpu_args, shared_critic
):
    """The policy has not moved between sampling and make_experience: the sampler's log-probs are the old log-probs
    (no policy forward for them), equal to the recomputing path's within float tolerance; values, reference
    log-probs and the samples are the same either way."""
    experiences, policy_calls = {}, {}
    for recompute in (True, False):
        # share_prompt_forward off: prompt_rows repeats prompts, which would split a recomputing pass in two calls
        args = ppo_args(
            cpu_args, recompute_old_logprobs=recompute, shared_critic=shared_critic, share_prompt_forward=False
        )
        trainer = target_ppo(args, tiny_tokenizer, make_lm(), train_dataset=prompt_rows)
        assert args.old_logprobs_from_sampler is (not recompute)
        calls = _forward_counter(trainer.policy)
        experiences[recompute] = trainer.make_experience(trainer.train_dataset[list(range(8))], step=0)
        # decode steps feed one token per row; full-sequence passes feed the whole (prompt + response)
        policy_calls[recompute] = sum(shape[1] > 1 for shape in calls)
    fresh, sampled = experiences[True], experiences[False]
    assert torch.equal(fresh.sequences, sampled.sequences)
    torch.testing.assert_close(sampled.old_logprobs, fresh.old_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(sampled.values, fresh.values)
    torch.testing.assert_close(sampled.ref_logprobs, fresh.ref_logprobs)
    # the prefill is a full pass either way; recomputing adds one (a value pass on the shared critic remains)
    assert policy_calls[True] == policy_calls[False] + (0 if shared_critic else 1)


def test_recompute_old_logprobs_defaults_to_recomputing_under_bf16_only(cpu_args):
    from rlhf_ext import GRPOConfig, PPOConfig

    assert PPOConfig(**cpu_args).old_logprobs_from_sampler
    assert not GRPOConfig(**cpu_args, recompute_old_logprobs=True).old_logprobs_from_sampler
    assert GRPOConfig(**cpu_args, bf16=True, recompute_old_logprobs=False).old_logprobs_from_sampler
    assert not PPOConfig(**cpu_args, bf16=True).old_logprobs_from_sampler


def test_grpo_old_logprobs_from_the_sampler_equal_a_recomputed_forward(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    """With num_iterations = 2 the policy moves before the samples are used up, so old log-probs are kept: the
    sampler's (no forward for them) or recomputed, equal within float tolerance."""
    from rlhf_ext import GRPOTrainer

    experiences, passes = {}, {}
    for recompute in (True, False):
        # share_prompt_forward off: each group's prompt would split a recomputing pass in two calls
        args = grpo_args(cpu_args, num_iterations=2, recompute_old_logprobs=recompute, share_prompt_forward=False)
        trainer = GRPOTrainer(
            make_lm(), [target_fraction], args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
        )
        calls = _forward_counter(trainer.policy)
        experiences[recompute], _ = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
        passes[recompute] = sum(shape[1] > 1 for shape in calls)
    assert torch.equal(experiences[True].sequences, experiences[False].sequences)
    torch.testing.assert_close(experiences[False].old_logprobs, experiences[True].old_logprobs, atol=1e-4, rtol=0)
    assert passes[True] == passes[False] + 1
