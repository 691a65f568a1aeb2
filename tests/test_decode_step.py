"""decode_step (CPU only): the fused Llama-style decode step against its eager twin (values and cache writes at odd
shapes, grouped-query and multi-head attention, left padding), thread-count independence, opcheck, bad inputs; and
through `rlhf_ext.models.fused_decode`, against the Hugging Face model's own forward and `generate`."""

import copy

import pytest
import torch

from rlhf_ext.generation.rollout import generate
from rlhf_ext.models.fused_decode import FusedDecoder, why_not_fused
from rlhf_ext.models.introspect import growing_kv_cache, position_ids_from_mask
from rlhf_ext.models.tiny import tiny_causal_lm
from rlhf_ext.ops import decode_step, pack_decoder_layer
from rlhf_ext.ops.decode_step import _random_step
from rlhf_ext.ops.reference import decode_step_reference, pack_decoder_layer_reference

# (B, H, heads, kv_heads, head_dim, intermediate, layers, capacity, slot)
SHAPES = [
    (1, 16, 2, 1, 8, 24, 1, 4, 3),
    (3, 48, 4, 2, 12, 40, 2, 10, 7),
    (5, 36, 3, 3, 12, 20, 3, 9, 8),
    (16, 256, 4, 2, 64, 512, 4, 96, 63),
    (7, 40, 8, 1, 10, 72, 2, 30, 11),
]


def _step(shape, seed=0):
    return list(_random_step(*shape, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}h{}kv{}D{}I{}L{}C{}s{}".format(*s))
def test_matches_the_eager_twin_and_writes_only_its_slot(shape):
    args = _step(shape)
    twin = copy.deepcopy(args)
    before_k, before_v = args[3].clone(), args[4].clone()
    out = decode_step(*args)
    expected = decode_step_reference(*twin)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    slot = shape[-1]
    torch.testing.assert_close(args[3], twin[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[4], twin[4], rtol=1e-5, atol=1e-5)
    others = torch.ones(args[3].shape[3], dtype=torch.bool)
    others[slot] = False
    assert torch.equal(args[3][:, :, :, others], before_k[:, :, :, others])
    assert torch.equal(args[4][:, :, :, others], before_v[:, :, :, others])
    assert not torch.equal(args[3][:, :, :, slot], before_k[:, :, :, slot])


def test_masked_slots_do_not_count():
    """Huge keys and values in masked (left-padding) slots change nothing."""
    args = _step(SHAPES[1])
    args[5][:, :2] = False
    out = decode_step(*copy.deepcopy(args))
    args[3][:, :, :, :2] = 1e4
    args[4][:, :, :, :2] = -1e4
    torch.testing.assert_close(decode_step(*args), out, rtol=0, atol=0)


def test_results_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(decode_step(*_step(SHAPES[3])))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_a_rows_results_do_not_depend_on_the_rows_beside_it():
    """Rows 1..2 alone give the same bits as inside the batch of 5 (one process or two sample the same tokens)."""
    args = _step(SHAPES[2])
    full = decode_step(*copy.deepcopy(args))
    part = copy.deepcopy(args)
    for i in (0, 1, 2, 5):
        part[i] = part[i][1:3].contiguous()
    part[3], part[4] = part[3][:, 1:3].contiguous(), part[4][:, 1:3].contiguous()
    assert torch.equal(decode_step(*part), full[1:3])


def test_opcheck():
    args = _step(SHAPES[1])
    torch.library.opcheck(torch.ops.rlhf_ext.decode_step, tuple(args))


def _with(index, value):
    args = _step(SHAPES[1])
    args[index] = value(args[index]) if callable(value) else value
    return args


def _weight(index, value):
    args = _step(SHAPES[1])
    args[7][index] = value(args[7][index])
    return args


BAD = [
    (_with(0, lambda t: t.double()), TypeError, "hidden: expected a float32"),
    (_with(0, lambda t: t[0]), RuntimeError, "hidden: expected a 2-d tensor"),
    (_with(1, lambda t: t[:, :11]), RuntimeError, "cos: expected an even head_dim"),
    (_with(2, lambda t: t[:2]), RuntimeError, r"sin: expected shape \[3, 12\]"),
    (_with(3, lambda t: t[:, :2]), RuntimeError, "key_cache: expected shape"),
    (_with(3, lambda t: t.transpose(3, 4).contiguous().transpose(3, 4)), RuntimeError, "key_cache: expected a contig"),
    (_with(4, lambda t: t[..., :5, :]), RuntimeError, "value_cache: expected shape"),
    (_with(5, lambda t: t.long()), TypeError, "key_mask: expected a bool tensor"),
    (_with(6, 10), RuntimeError, r"slot: expected a cache slot in \[0, 10\)"),
    (_with(6, True), TypeError, "slot: expected an int"),
    (_with(7, lambda w: w[:-1]), RuntimeError, "weights: expected 6 tensors per layer, 12"),
    (_with(7, "packed"), TypeError, "weights: expected a list of tensors"),
    (_weight(1, lambda t: t[:, :-1]), RuntimeError, r"weights\[1\]: expected shape"),
    (_weight(9, lambda t: t[:-1]), RuntimeError, r"weights\[9\]: expected shape"),
    (_weight(0, lambda t: t.half()), TypeError, r"weights\[0\]: expected a float32"),
    (_with(8, lambda t: t[:-1]), RuntimeError, "final_norm: expected shape"),
    (_with(9, 3), RuntimeError, "num_heads: expected a positive multiple of kv_heads = 2"),
    (_with(10, float("nan")), RuntimeError, "eps: expected a finite value"),
    (_with(11, float("inf")), RuntimeError, "scaling: expected a finite value"),
    (_with(0, lambda t: t.requires_grad_()), RuntimeError, "decode_step has no gradient"),
]


@pytest.mark.parametrize("args,error,match", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_inputs_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        decode_step(*args)


def test_a_row_whose_slot_is_masked_is_refused():
    args = _step(SHAPES[1])
    args[5][1, args[6]] = False
    with pytest.raises(RuntimeError, match="key_mask: expected True at slot 7 in every row"):
        decode_step(*args)


def _layer_weights(H=24, heads=4, kv=2, D=6, inter=20):
    g = torch.Generator().manual_seed(2)
    shapes = dict(
        input_norm=(H,),
        q=(heads * D, H),
        k=(kv * D, H),
        v=(kv * D, H),
        o=(H, heads * D),
        post_norm=(H,),
        gate=(inter, H),
        up=(inter, H),
        down=(H, inter),
    )
    return {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def test_pack_decoder_layer_is_its_reference_exactly():
    weights = _layer_weights()
    for ours, twin in zip(pack_decoder_layer(**weights), pack_decoder_layer_reference(**weights)):
        assert torch.equal(ours, twin)


@pytest.mark.parametrize(
    "name,value,error,match",
    [
        ("k", torch.randn(12, 23), ValueError, r"k: expected shape \[12, 24\]"),
        ("v", torch.randn(8, 24), ValueError, r"v: expected shape \[12, 24\]"),
        ("o", torch.randn(24, 23), ValueError, r"o: expected shape \[24, 24\]"),
        ("input_norm", torch.randn(23), ValueError, r"input_norm: expected shape \[24\]"),
        ("down", torch.randn(24, 21), ValueError, r"down: expected shape \[24, 20\]"),
        ("up", torch.randn(20, 24).double(), TypeError, "up: expected a float32 tensor"),
        ("q", torch.randn(24), ValueError, "q: expected a 2-d weight"),
        ("gate", torch.randn(20, 24, device="meta"), RuntimeError, "gate: expected a tensor on cpu"),
    ],
)
def test_pack_decoder_layer_names_the_bad_weight(name, value, error, match):
    weights = dict(_layer_weights(), **{name: value})
    with pytest.raises(error, match=match):
        pack_decoder_layer(**weights)


# ---- through a Hugging Face model ----


def _llama(**overrides):
    return tiny_causal_lm("llama", vocab_size=97, hidden_size=48, num_layers=2, num_heads=4, **overrides).eval()


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return MistralForCausalLM(config).eval()


def _prompts(B=4, P=6, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for b in range(B):
        mask[b, : b % 3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("build", [_llama, _mistral], ids=["llama", "mistral"])
@torch.no_grad()
def test_fused_steps_give_the_models_own_logits(build):
    model = build()
    assert why_not_fused(model) is None
    ids, mask = _prompts()
    B, P = ids.shape
    steps = 5
    cache = growing_kv_cache(model.config, P + steps)
    model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), cache=cache, use_cache=True)
    decoder = FusedDecoder.for_model(model)
    assert decoder.load_cache(cache, mask, P + steps)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 97, (B, steps), generator=g)
    full_ids, full_mask = torch.cat([ids, tokens], 1), torch.cat([mask, torch.ones_like(tokens)], 1)
    expected = model(
        input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)
    ).logits[:, P:]
    positions = position_ids_from_mask(mask)[:, -1:] + 1
    for t in range(steps):
        logits = decoder.step(tokens[:, t], positions + t, P + t)
        torch.testing.assert_close(logits, expected[:, t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [_llama, _mistral], ids=["llama", "mistral"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_samples_the_same_with_and_without_the_fused_step(build, temperature):
    model = build()
    ids, mask = _prompts(B=6)
    ids[1], mask[1] = ids[0], mask[0]  # a shared prompt: the shared-prefill path feeds the fused steps too
    runs = []
    for fused in (True, False):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            runs.append(
                generate(
                    model,
                    ids,
                    mask,
                    max_new_tokens=12,
                    temperature=temperature,
                    pad_token_id=0,
                    generator=g,
                    fused_decode=fused,
                )
            )
    fused, eager = runs
    assert torch.equal(fused.response_ids, eager.response_ids)
    torch.testing.assert_close(fused.logprobs, eager.logprobs, rtol=1e-4, atol=1e-4)


def _with_hook(model):
    model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    return model


@pytest.mark.parametrize(
    "build,reason",
    [
        (lambda: tiny_causal_lm("gpt2", vocab_size=97).eval(), "GPT2LMHeadModel is not one of"),
        (lambda: tiny_causal_lm("qwen2", vocab_size=97).eval(), "Qwen2ForCausalLM is not one of"),
        (lambda: _llama(attention_bias=True), "without bias"),
        (lambda: _llama().to(torch.bfloat16), "float32"),
        (lambda: _llama(hidden_act="gelu"), "SiLU"),
        (lambda: _with_hook(_llama()), "forward hooks"),
    ],
    ids=["gpt2", "qwen2", "bias", "bf16", "gelu", "hook"],
)
def test_models_it_cannot_reproduce_keep_their_own_forward(build, reason):
    model = build()
    assert reason in why_not_fused(model)
    assert FusedDecoder.for_model(model) is None
    ids, mask = _prompts()
    if next(model.parameters()).dtype == torch.float32:
        with torch.no_grad():
            out = generate(model, ids, mask, max_new_tokens=3, pad_token_id=0, generator=torch.Generator())
        assert out.response_ids.shape == (4, 3)


def test_a_lora_adapter_keeps_the_models_own_forward():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "not a plain nn.Linear" in why_not_fused(model)


def test_fused_decode_must_be_a_bool():
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="fused_decode: expected a bool, got 'yes'"):
        generate(_llama(), ids, mask, max_new_tokens=2, pad_token_id=0, fused_decode="yes")
