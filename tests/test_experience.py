"""rlhf_ext.trainers.experience: keyed sampling through the one completion path, and the Experience record."""

import dataclasses

import pytest
import torch

from rlhf_ext.generation import SamplingSettings, generate, left_pad
from rlhf_ext.trainers.experience import Experience, sample_completions

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
