"""fused_linear_logprobs (lm_head fused, chunked) and the HF helper sequence_logprobs.

Tolerances: float32 paths are compared with a float64 oracle at 1e-5 (float32 matmul + logsumexp
accumulation); in bfloat16 the chunk logits are themselves rounded to bfloat16 by the matmul, so the
oracle starts from the same bfloat16 logits and the gradients (written in bfloat16, summed over
chunks in float32) get 2e-2 relative (a few bfloat16 ulps after a K-term matmul)."""

import pytest
import torch

from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.ops import fused_linear_logprobs, gather_logprobs
from rlhf_ext.ops.logprobs import _default_chunk_rows
from rlhf_ext.ops.reference import fused_linear_logprobs_reference

pytest.importorskip("transformers")

from tests.hf_helpers import full_logprobs, padded_batch, tiny_hf  # noqa: E402  (needs transformers)


def _fused_inputs(dtype=torch.float32, bias=True, seed=0, shape=(5, 10), H=24, V=301):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.15] = -100
    return hidden, weight, b, labels


def _loss(lp, ent, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (lp * torch.randn(lp.shape, generator=g)).sum() + (ent * torch.randn(ent.shape, generator=g)).sum()


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, None])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_values_and_grads_float32(chunk_size, bias):
    hidden, weight, b, labels = _fused_inputs(bias=bias)
    inputs = {"hidden": hidden, "weight": weight, "bias": b} if bias else {"hidden": hidden, "weight": weight}
    params = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    lp, ent = fused_linear_logprobs(
        labels=labels, **params, temperature=0.7, return_entropy=True, chunk_size=chunk_size
    )
    _loss(lp, ent).backward()
    ref_params = {name: t.double().requires_grad_() for name, t in inputs.items()}  # the float64 oracle's leaves
    rlp, rent = fused_linear_logprobs_reference(
        labels=labels, **ref_params, temperature=0.7, return_entropy=True, dtype=torch.float64
    )
    _loss(rlp, rent).backward()
    assert lp.shape == ent.shape == labels.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    for p, r in zip(params.values(), ref_params.values()):
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-5, atol=1e-5)
    assert torch.all(lp[labels == -100] == 0)


def test_fused_linear_bfloat16():
    hidden, weight, b, labels = _fused_inputs(torch.bfloat16)
    params = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    lp, ent = fused_linear_logprobs(*params[:2], labels, params[2], return_entropy=True, chunk_size=13)
    _loss(lp, ent).backward()
    # oracle from the same bf16 logits the kernel sees
    ref_params = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    logits = torch.nn.functional.linear(*ref_params[:2], ref_params[2])
    rlp, rent = gather_logprobs_reference_f64(logits, labels)
    _loss(rlp, rent).backward()
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-5)
    for p, r in zip(params, ref_params):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), r.grad.float(), rtol=2e-2, atol=2e-2 * r.grad.abs().max().item())


def gather_logprobs_reference_f64(logits, labels):
    from rlhf_ext.ops.reference import gather_logprobs_reference

    return gather_logprobs_reference(logits, labels, return_entropy=True, dtype=torch.float64)


def test_fused_linear_chunking_does_not_change_results():
    hidden, weight, b, labels = _fused_inputs(shape=(97,))
    outs = [fused_linear_logprobs(hidden, weight, labels, b, chunk_size=c) for c in (1, 10, 96, 97, 500)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        outs[0], gather_logprobs(torch.nn.functional.linear(hidden, weight, b), labels), rtol=1e-6, atol=1e-6
    )


def test_fused_linear_frozen_weight_and_no_grad():
    hidden, weight, b, labels = _fused_inputs()
    h = hidden.clone().requires_grad_()
    fused_linear_logprobs(h, weight, labels, b, chunk_size=9).sum().backward()
    ref = hidden.double().requires_grad_()
    fused_linear_logprobs_reference(ref, weight.double(), labels, b.double(), dtype=torch.float64).sum().backward()
    torch.testing.assert_close(h.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = fused_linear_logprobs(hidden, weight, labels, b)
    assert not out.requires_grad


def test_default_chunk_rows():
    assert _default_chunk_rows(16384, 512, 32000) == 512  # chunk logits ~ the size of hidden
    assert _default_chunk_rows(10, 512, 32000) == 10
    assert _default_chunk_rows(100000, 4096, 128256) == 4096


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.randn(50, 7)), r"weight: expected shape \[V, H\] with H = hidden.shape\[-1\] = 8"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), r"labels: expected shape \[4\] \(hidden.shape\[:-1\]\)"),
        (dict(bias=torch.randn(49)), r"bias: expected shape \[50\]"),
        (dict(chunk_size=0), "chunk_size: expected a positive int or None"),
        (dict(weight=torch.randn(0, 8), bias=None), r"weight: expected a non-empty vocabulary"),
    ],
)
def test_fused_linear_bad_inputs(kwargs, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(50, 8), labels=torch.zeros(4, dtype=torch.long), bias=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(**args)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (
            dict(hidden=torch.randn(4, 0), weight=torch.randn(50, 0)),
            ValueError,
            r"hidden: expected a hidden size H = hidden.shape\[-1\] > 0, got shape \[4, 0\]",
        ),
        (
            dict(weight=torch.randn(50, 8, dtype=torch.bfloat16)),
            TypeError,
            r"weight: expected dtype torch.float32 \(the dtype of hidden\), got torch.bfloat16",
        ),
        (
            dict(bias=torch.randn(50, dtype=torch.float64)),
            TypeError,
            r"bias: expected dtype torch.float32 \(the dtype of hidden\), got torch.float64",
        ),
        (
            dict(hidden=torch.ones(4, 8, dtype=torch.bool), weight=torch.ones(50, 8, dtype=torch.bool)),
            TypeError,
            r"hidden: expected a float32/bfloat16/float16/float64 tensor, got torch.bool",
        ),
        (
            dict(weight=torch.ones(50, 8, dtype=torch.bool)),
            TypeError,
            r"weight: expected dtype torch.float32 \(the dtype of hidden\), got torch.bool",
        ),
    ],
)
def test_fused_linear_bad_dtypes_and_sizes_are_named(kwargs, err, match):
    args = dict(hidden=torch.randn(4, 8), weight=torch.randn(50, 8), labels=torch.zeros(4, dtype=torch.long), bias=None)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fused_linear_logprobs(**args)


# ---- HF helper ----


@pytest.mark.parametrize("kind", ["llama_bias", "gpt2", "qwen2", "cohere", "granite"])
@pytest.mark.parametrize("fused", [False, True])
def test_sequence_logprobs_matches_full_logits(kind, fused):
    model = tiny_hf(kind)
    ids, mask = padded_batch()
    lp, ent = sequence_logprobs(
        model, ids, mask, 5, temperature=0.8, return_entropy=True, fused_linear=fused, chunk_size=4
    )
    rlp, rent = full_logprobs(model, ids, mask, 5, temperature=0.8)
    assert lp.shape == (3, 7) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=2e-5)
    # parameter gradients, including the lm_head / tied embedding and the bias
    model.zero_grad()
    _loss(lp, ent).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    _loss(*full_logprobs(model, ids, mask, 5, temperature=0.8)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad.to(ours[name].dtype), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["llama_bias", "gpt2"])
def test_left_padded_row_equals_the_unpadded_sequence(kind):
    model = tiny_hf(kind)
    ids, mask = padded_batch()
    batch = sequence_logprobs(model, ids, mask, 6)
    alone = sequence_logprobs(model, ids[2:, 4:], mask[2:, 4:], 2)  # row 2 without its 4 pads
    torch.testing.assert_close(batch[2:], alone, rtol=1e-5, atol=1e-5)


def test_softcap_model_unfused_matches_and_fused_refuses():
    model = tiny_hf("gemma2")
    ids, mask = padded_batch()
    lp = sequence_logprobs(model, ids, mask, 4)
    torch.testing.assert_close(lp.double(), full_logprobs(model, ids, mask, 4)[0], rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match="final logit softcap"):
        sequence_logprobs(model, ids, mask, 4, fused_linear=True)


@pytest.mark.parametrize("fused", [False, True])
def test_peft_lora_model(fused):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_hf("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids, mask = padded_batch()
    lp = sequence_logprobs(model, ids, mask, 5, fused_linear=fused)
    rlp, _ = full_logprobs(model, ids, mask, 5)
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    lp.sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_sequence_logprobs_edge_cases_and_errors():
    model = tiny_hf("qwen2")
    ids, mask = padded_batch()
    lp, ent = sequence_logprobs(model, ids, mask, 12, return_entropy=True)
    assert lp.shape == ent.shape == (3, 0)
    full = sequence_logprobs(model, ids[:, 4:], mask[:, 4:], 1)  # response from the 2nd column on
    assert full.shape == (3, 7)
    with pytest.raises(ValueError, match=r"response_start: expected an int in \[1, 12\]"):
        sequence_logprobs(model, ids, mask, 0)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        sequence_logprobs(model, ids, mask[:, 1:], 3)
