"""Rollout engine: greedy parity with HF generate, log-probs against a full forward pass, stop handling,
values, reproducibility and bad inputs, on tiny models built from configs."""

from types import SimpleNamespace

import pytest
import torch

import rlhf_ext  # noqa: F401
from rlhf_ext.generation import generate
from rlhf_ext.models import position_ids_from_mask
from tests.rollout_helpers import PAD, VOCAB, forward_logprobs, tiny


def prompts(batch=4, length=7, seed=1):
    """Left-padded prompts of uneven lengths (length, length - 2, ...)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : (2 * row) % (length - 1)] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_matches_hf_generate(kind, cache):
    model = tiny(kind)
    ids, mask = prompts()
    with torch.no_grad():
        free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=PAD)
        eos = int(free[0, ids.shape[1] + 4])  # a token row 0 emits, so at least one row stops early
        hf = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=PAD, eos_token_id=eos
        )
        ours = generate(
            model, ids, mask, max_new_tokens=12, temperature=0.0, eos_token_id=eos, pad_token_id=PAD, cache=cache
        )
    assert torch.equal(ours.sequences, hf), "greedy rollout differs from HF generate"
    assert ours.finished[0]
    torch.testing.assert_close(
        ours.logprobs * ours.response_mask,
        forward_logprobs(model, ours, 1.0) * ours.response_mask,
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampled_logprobs_match_full_forward(kind):
    model = tiny(kind)
    ids, mask = prompts(batch=6, length=9, seed=2)
    T = 0.8
    with torch.no_grad():
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=16,
            temperature=T,
            top_k=20,
            top_p=0.9,
            eos_token_id=5,
            pad_token_id=PAD,
            generator=torch.Generator().manual_seed(0),
        )
        ref = forward_logprobs(model, out, T)
    m = out.response_mask.bool()
    torch.testing.assert_close(out.logprobs[m], ref[m], atol=1e-4, rtol=1e-4)
    assert (out.logprobs[~m] == 0).all() and (out.response_ids[~m] == PAD).all()
    assert out.logprobs.dtype == torch.float32 and out.sequences.shape == (6, 9 + out.response_ids.shape[1])


def test_stop_tokens_truncation_and_early_exit():
    model = tiny("llama")
    ids, mask = prompts(batch=5, length=6, seed=3)
    free = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, pad_token_id=PAD).response_ids
    stops = [int(free[0, 2]), int(free[1, 5])]
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=10,
        temperature=0.0,
        eos_token_id=stops[0],
        stop_token_ids=[stops[1]],
        pad_token_id=PAD,
    )
    lengths, finished = [], []
    for row in free.tolist():
        hit = [i for i, tok in enumerate(row) if tok in stops]
        lengths.append(hit[0] + 1 if hit else 10)
        finished.append(bool(hit))
    assert out.response_lengths.tolist() == lengths
    assert out.finished.tolist() == finished
    R = max(lengths) if all(finished) else 10
    assert out.response_ids.shape == (5, R)
    for row, n in enumerate(lengths):
        assert out.response_ids[row, :n].tolist() == free[row, :n].tolist()
        assert (out.response_ids[row, n:] == PAD).all()
        assert out.response_mask[row].tolist() == [1] * n + [0] * (R - n)
    # Every row stops at once: the loop ends after one step.
    first = generate(
        model, ids, mask, max_new_tokens=10, temperature=0.0, stop_token_ids=free[:, 0].tolist(), pad_token_id=PAD
    )
    assert first.response_ids.shape == (5, 1) and first.finished.all()
    # Nothing stops: truncated everywhere.
    none = generate(model, ids, mask, max_new_tokens=4, temperature=0.0, pad_token_id=PAD)
    assert not none.finished.any() and none.response_mask.all() and none.response_ids.shape == (5, 4)


def test_reproducible_and_per_row_settings():
    model = tiny("qwen2")
    ids, mask = prompts(batch=4, length=6, seed=4)
    kw = dict(max_new_tokens=8, top_k=30, min_p=0.02, pad_token_id=PAD)
    a = generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    # Rows with temperature 0 are greedy, whatever the others do.
    temps = torch.tensor([0.0, 1.0, 0.0, 1.5])
    mixed = generate(model, ids, mask, temperature=temps, generator=torch.Generator().manual_seed(1), **kw)
    greedy = generate(model, ids, mask, temperature=0.0, **kw)
    assert torch.equal(mixed.response_ids[[0, 2]], greedy.response_ids[[0, 2]])


def test_peft_lora_policy():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for module in model.modules():  # non-zero adapters, so the LoRA path changes the outputs
            if hasattr(module, "lora_B"):
                for linear in module.lora_B.values():
                    linear.weight.normal_(0, 0.5)
    from rlhf_ext.generation.rollout import _forward_kwargs

    assert _forward_kwargs(model) == {"logits_to_keep": 1}
    ids, mask = prompts()
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=PAD)
    ours = generate(model, ids, mask, max_new_tokens=6, temperature=0.0, pad_token_id=PAD)
    assert torch.equal(ours.sequences, hf)


class ValueHeadModel(torch.nn.Module):
    """A policy with a value head: the output carries `values` [B, L, 1] next to the logits."""

    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config
        self.v_head = torch.nn.Linear(base.config.hidden_size, 1)

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0
    ):
        out = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=True,
            logits_to_keep=logits_to_keep,
        )
        return SimpleNamespace(logits=out.logits, values=self.v_head(out.hidden_states[-1]))


def test_return_values():
    model = ValueHeadModel(tiny("llama")).eval()
    ids, mask = prompts(batch=3, length=6, seed=5)
    out = generate(
        model,
        ids,
        mask,
        max_new_tokens=6,
        temperature=0.0,
        eos_token_id=int(ids[0, -1]),
        pad_token_id=PAD,
        return_values=True,
    )
    full_mask = out.attention_mask
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask))
    P = out.prompt_length
    expected = full.values.squeeze(-1)[:, P - 1 : -1] * out.response_mask
    torch.testing.assert_close(out.values, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="no `values`"):
        generate(tiny("llama"), ids, mask, max_new_tokens=2, pad_token_id=PAD, return_values=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attention_mask=torch.ones(4, 6, dtype=torch.long)), "attention_mask: expected shape"),
        (dict(pad_token_id=None), "pad_token_id: required"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.2), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(cache="paged"), "cache"),
        (dict(cuda_graph=True, cache="static"), "cuda_graph"),
        (dict(right_padded=True), "left-padded"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
    ],
)
def test_bad_inputs(kwargs, match):
    model = tiny("gpt2")
    ids, mask = prompts()
    if kwargs.pop("right_padded", False):
        mask = mask.flip(1)
    args = dict(attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
    args.update(kwargs)
    attention_mask = args.pop("attention_mask")
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, ids, attention_mask, **args)


@pytest.mark.cuda
def test_cuda_graph_decode_matches_eager():
    model = tiny("llama").cuda()
    ids, mask = prompts(batch=4, length=7)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=12, pad_token_id=PAD, cache="static")
    eager = generate(model, ids, mask, temperature=0.0, **kw)
    graphed = generate(model, ids, mask, temperature=0.0, cuda_graph=True, **kw)
    assert torch.equal(eager.sequences, graphed.sequences)
    sampled = generate(
        model,
        ids,
        mask,
        temperature=0.9,
        top_k=20,
        cuda_graph=True,
        generator=torch.Generator("cuda").manual_seed(0),
        **kw,
    )
    m = sampled.response_mask.bool()
    torch.testing.assert_close(sampled.logprobs[m], forward_logprobs(model, sampled, 0.9)[m], atol=1e-3, rtol=1e-3)
