"""The one completion path (`rlhf_ext.generation.complete`): same draws as `generate`, keyed chunks, decoding, and
`SamplingSettings` refusing bad knobs by name."""

import pytest
import torch

from rlhf_ext.generation import SamplingSettings, complete, generate, left_pad, response_texts


@pytest.fixture(scope="module")
def lm_and_prompts(make_lm, tiny_tokenizer):
    model = make_lm().eval()
    texts = ["the cat", "a dog ran", "we", "one two three four"]
    ids, mask = left_pad([tiny_tokenizer(t)["input_ids"] for t in texts], tiny_tokenizer.pad_token_id)
    settings = SamplingSettings(
        max_new_tokens=6, pad_token_id=tiny_tokenizer.pad_token_id, stop_token_id=tiny_tokenizer.eos_token_id
    )
    return model, ids, mask, settings


def test_left_pad_puts_tokens_at_the_end():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_one_chunk_draws_what_generate_draws(lm_and_prompts):
    model, ids, mask, settings = lm_and_prompts
    ours = complete(model, ids, mask, settings, generator=torch.Generator().manual_seed(3))
    theirs = generate(
        model,
        ids,
        mask,
        max_new_tokens=6,
        eos_token_id=settings.stop_token_id,
        pad_token_id=settings.pad_token_id,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.logprobs, theirs.logprobs)


def test_keyed_chunks_do_not_depend_on_how_rows_are_split(lm_and_prompts):
    model, ids, mask, settings = lm_and_prompts

    def seed(first_row):
        return 1000 + first_row

    whole = complete(model, ids, mask, settings, chunk_size=2, chunk_seed=seed)
    first = complete(model, ids[:2], mask[:2], settings, chunk_seed=seed)
    second = complete(model, ids[2:], mask[2:], settings, chunk_seed=lambda row: seed(row + 2))
    for part, rows in ((first, slice(0, 2)), (second, slice(2, 4))):
        R = part.response_ids.shape[1]
        assert torch.equal(whole.response_ids[rows, :R], part.response_ids)
        assert torch.equal(whole.response_mask[rows, :R], part.response_mask)
        assert not whole.response_mask[rows, R:].any()  # columns beyond this chunk's own length are padding


def test_response_texts_stop_at_the_stop_token(lm_and_prompts, tiny_tokenizer):
    model, ids, mask, settings = lm_and_prompts
    rollout = complete(model, ids, mask, settings, generator=torch.Generator().manual_seed(0))
    texts, token_ids = response_texts(tiny_tokenizer, rollout)
    assert [len(t) for t in token_ids] == rollout.response_lengths.tolist()
    assert texts == tiny_tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    assert settings.greedy().top_k == 1 and settings.top_k == 0


@pytest.mark.parametrize(
    "name, value",
    [("max_new_tokens", 0), ("pad_token_id", None), ("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("min_p", 2)],
)
def test_bad_settings_are_refused_by_name(name, value):
    kwargs = dict(max_new_tokens=4, pad_token_id=0)
    kwargs[name] = value
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        SamplingSettings(**kwargs)


def test_bad_chunk_size_is_refused(lm_and_prompts):
    model, ids, mask, settings = lm_and_prompts
    with pytest.raises(ValueError, match="chunk_size: expected"):
        complete(model, ids, mask, settings, chunk_size=0)
