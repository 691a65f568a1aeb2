"""Shared-prompt prefill in `generate`: runs of identical consecutive prompts (GRPO's groups) are prefilled once
and their KV cache expanded to the group; the samples are those of the unshared prefill for the same seed."""

import pytest
import torch

from rlhf_ext.generation import complete, generate
from rlhf_ext.generation.completions import SamplingSettings, left_pad
from tests.rollout_helpers import PAD, VOCAB, forward_logprobs, tiny

# Three prompts of different lengths (so the batch is left-padded), each repeated G = 4 times, then one lone prompt.
PROMPTS = [[5, 9, 14], [7, 3, 22, 41, 8], [60, 2]]
G = 4


def grouped_prompts(lone=True):
    rows = [p for p in PROMPTS for _ in range(G)] + ([[11, 12, 13, 14]] if lone else [])
    return left_pad(rows, PAD)


def prefill_batch_sizes(model):
    """Record the batch size of every forward whose input has more than one position (the prefill)."""
    sizes = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            sizes.append(ids.shape[0])

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


def sample_both_ways(model, ids, mask, **kwargs):
    out = {}
    for share in (True, False):
        generator = torch.Generator().manual_seed(1234)
        out[share] = generate(
            model, ids, mask, pad_token_id=PAD, generator=generator, share_prompt_prefill=share, **kwargs
        )
    return out[True], out[False]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_shared_prefill_gives_the_same_samples(kind):
    model = tiny(kind)
    ids, mask = grouped_prompts()
    sizes, handle = prefill_batch_sizes(model)
    try:
        shared, unshared = sample_both_ways(model, ids, mask, max_new_tokens=12, temperature=2.0, eos_token_id=3)
    finally:
        handle.remove()
    assert sizes == [len(PROMPTS) + 1, ids.shape[0]]  # one prefill row per distinct prompt, then all rows
    assert torch.equal(shared.sequences, unshared.sequences)
    assert torch.equal(shared.response_mask, unshared.response_mask)
    assert torch.equal(shared.finished, unshared.finished)
    torch.testing.assert_close(shared.logprobs, unshared.logprobs, rtol=1e-5, atol=1e-5)
    # Rows of one group really are different samples, and the sampler's log-probs still match a full forward.
    assert len({tuple(row) for row in shared.response_ids[:G].tolist()}) > 1
    expected = forward_logprobs(model, shared, 2.0) * shared.response_mask
    torch.testing.assert_close(shared.logprobs, expected, rtol=1e-4, atol=1e-4)


def test_no_repeated_prompt_prefills_every_row():
    model = tiny("llama")
    ids, mask = left_pad(PROMPTS, PAD)
    sizes, handle = prefill_batch_sizes(model)
    try:
        shared, unshared = sample_both_ways(model, ids, mask, max_new_tokens=6)
    finally:
        handle.remove()
    assert sizes == [len(PROMPTS), len(PROMPTS)]
    assert torch.equal(shared.sequences, unshared.sequences)


def test_same_ids_with_other_padding_are_not_shared():
    # Equal ids but a different mask (a real token 0 = PAD id against left padding) are different prompts.
    model = tiny("llama")
    ids = torch.tensor([[PAD, 4, 5], [PAD, 4, 5]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    sizes, handle = prefill_batch_sizes(model)
    try:
        shared, unshared = sample_both_ways(model, ids, mask, max_new_tokens=4, temperature=0.0)
    finally:
        handle.remove()
    assert sizes == [2, 2]
    assert torch.equal(shared.sequences, unshared.sequences)


def test_static_cache_and_values_fall_back_to_full_prefill():
    model = tiny("llama")
    ids, mask = grouped_prompts(lone=False)
    sizes, handle = prefill_batch_sizes(model)
    try:
        shared, unshared = sample_both_ways(model, ids, mask, max_new_tokens=5, cache="static")
    finally:
        handle.remove()
    assert sizes == [ids.shape[0], ids.shape[0]]
    assert torch.equal(shared.sequences, unshared.sequences)


def test_complete_shares_by_default():
    model = tiny("llama")
    ids, mask = grouped_prompts(lone=False)
    settings = SamplingSettings(max_new_tokens=4, pad_token_id=PAD)
    sizes, handle = prefill_batch_sizes(model)
    try:
        rollout = complete(model, ids, mask, settings, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert sizes == [len(PROMPTS)]
    assert rollout.sequences.shape[0] == ids.shape[0] and int(rollout.sequences.max()) < VOCAB


def test_bad_flag():
    model = tiny("llama")
    ids, mask = grouped_prompts()
    with pytest.raises(ValueError, match="share_prompt_prefill: expected a bool, got 'yes'"):
        generate(model, ids, mask, max_new_tokens=2, pad_token_id=PAD, share_prompt_prefill="yes")
