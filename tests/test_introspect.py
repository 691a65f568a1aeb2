"""The one rule for what a model does after its lm_head (rlhf_ext/models/introspect.py): a linear logit scale
(Cohere's `logit_scale`, Granite's `logits_scaling`) is folded into the fused path's temperature, so every
fused helper gives the model's own log-probs; a tanh softcap (Gemma 2) is refused by every fused helper."""

import pytest
import torch

from rlhf_ext.models import (
    ValueHead,
    causal_lm_token_logprobs,
    linear_lm_head,
    logit_transform,
    logprobs_and_values,
    position_ids_from_mask,
    sequence_logprobs,
)

pytest.importorskip("transformers")

from tests.hf_helpers import full_logprobs, padded_batch, tiny_hf  # noqa: E402  (needs transformers)

TOL = dict(rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(("kind", "scale"), [("qwen2", 1.0), ("cohere", 0.5), ("granite", 0.25)])
def test_logit_scale_is_read_from_the_config_and_folded_into_the_temperature(kind, scale):
    model = tiny_hf(kind)
    assert logit_transform(model) == (scale, None)
    weight, bias, temperature = linear_lm_head(model, 0.8)
    assert weight is model.get_output_embeddings().weight and temperature == pytest.approx(0.8 / scale)
    # the model's own forward applies that scale: its logits are the lm_head's times `scale`
    ids, mask = padded_batch()
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), output_hidden_states=True
    )
    torch.testing.assert_close(out.logits, torch.nn.functional.linear(out.hidden_states[-1], weight, bias) * scale)


@pytest.mark.parametrize("kind", ["cohere", "granite"])
def test_every_fused_helper_matches_the_models_own_logits(kind):
    model = tiny_hf(kind)
    ids, mask = padded_batch()
    expected, expected_entropy = full_logprobs(model, ids, mask, 5, temperature=0.8)
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, mask, 5, temperature=0.8, fused_linear=True)
        shared_lp, entropy, values = logprobs_and_values(
            model, ValueHead(32), ids, mask, 5, temperature=0.8, return_entropy=True
        )
        token_lp = causal_lm_token_logprobs(model, ids, mask, labels=ids, fused_linear=True)
        unfused_token_lp = causal_lm_token_logprobs(model, ids, mask, labels=ids, fused_linear=False)
    torch.testing.assert_close(lp.double(), expected, **TOL)
    torch.testing.assert_close(shared_lp.double(), expected, **TOL)
    torch.testing.assert_close(entropy.double(), expected_entropy, **TOL)
    assert values.shape == (3, 7) and not values.any()  # the value head starts at zero
    torch.testing.assert_close(token_lp[:, 4:].double(), full_logprobs(model, ids, mask, 5)[0], **TOL)
    torch.testing.assert_close(token_lp, unfused_token_lp, **TOL)


def test_every_fused_helper_refuses_a_softcap():
    model = tiny_hf("gemma2")
    ids, mask = padded_batch()
    assert logit_transform(model) == (1.0, 3.0)
    for call in (
        lambda: linear_lm_head(model),
        lambda: sequence_logprobs(model, ids, mask, 5, fused_linear=True),
        lambda: logprobs_and_values(model, ValueHead(32), ids, mask, 5),
        lambda: causal_lm_token_logprobs(model, ids, mask, labels=ids, fused_linear=True),
    ):
        with pytest.raises(ValueError, match="Gemma2ForCausalLM applies a final logit softcap"):
            call()


@pytest.mark.parametrize("kind", ["llama_bias", "cohere", "gpt2", "gemma2"])
def test_cpu_packed_head_gives_the_models_own_logits_and_restores_the_head(kind):
    from rlhf_ext.models.introspect import cpu_packed_head

    model = tiny_hf(kind)
    head = model.get_output_embeddings()
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        plain = model(**kwargs).logits  # (B, L, V)
        with cpu_packed_head(model) as ctx:
            assert ctx.head is head and "forward" in vars(head)  # packed_linear is in place
            patched = model(**kwargs).logits
            last = model(**kwargs, logits_to_keep=1).logits  # (B, 1, V): the decode-step shape
    assert "forward" not in vars(head)  # the class's forward again
    torch.testing.assert_close(patched, plain, **TOL)
    torch.testing.assert_close(last, plain[:, -1:], **TOL)


def test_cpu_packed_head_leaves_other_heads_alone():
    from rlhf_ext.models.introspect import cpu_packed_head

    model = tiny_hf("llama_bias").to(torch.float64)
    with cpu_packed_head(model) as ctx:
        assert ctx.head is None and "forward" not in vars(model.get_output_embeddings())
    head = torch.nn.Linear(4, 6)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    head.forward = lambda x: x  # an instance override of its own: not replaced, not deleted
    with cpu_packed_head(model) as ctx:
        assert ctx.head is None
    assert head.forward(torch.ones(1)).shape == (1,)


def test_cpu_packed_head_rows_do_not_depend_on_the_batch_split():
    """A row's logits are the same bits whatever rows come with it (the 1-process and 2-process runs of
    tests/test_distributed.py rely on it): a decode step's few rows and a training forward's many alike."""
    from rlhf_ext.models.introspect import cpu_packed_head

    model = tiny_hf("llama_bias")
    head = model.get_output_embeddings()
    x = torch.randn(600, head.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cpu_packed_head(model):
        full = head(x)
        for n in (1, 4, 8, 15, 16, 24, 47, 300):
            assert torch.equal(head(x[:n]), full[:n]), n
            assert torch.equal(head(x[-n:]), full[-n:]), n
    torch.testing.assert_close(full, torch.nn.functional.linear(x, head.weight, head.bias).detach(), **TOL)


def test_cpu_packed_head_gradients_are_linears():
    """With gradients the forward is packed_linear and the backward F.linear's: the same gradients to rounding."""
    from rlhf_ext.models.introspect import cpu_packed_head

    model = tiny_hf("llama_bias")
    head = model.get_output_embeddings()
    x = torch.randn(3, 7, head.in_features, requires_grad=True)
    upstream = torch.randn(3, 7, head.out_features)
    expected = torch.autograd.grad(
        (torch.nn.functional.linear(x, head.weight, head.bias) * upstream).sum(), (x, head.weight, head.bias)
    )
    with cpu_packed_head(model):
        out = head(x)
        assert out.grad_fn is not None and "PackedHeadLinear" in type(out.grad_fn).__name__
        got = torch.autograd.grad((out * upstream).sum(), (x, head.weight, head.bias))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    with cpu_packed_head(model), torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(x).dtype == torch.bfloat16  # under autocast: F.linear in the autocast dtype


def test_cpu_packed_head_repacks_after_the_weight_changes():
    """An engine keeps its cpu_packed_head across training steps: an optimizer step (in place) or a new weight
    tensor must not leave it multiplying with the old packed weight. A gradient-needing call keeps F.linear."""
    from rlhf_ext.models.introspect import cpu_packed_head

    model = tiny_hf("llama_bias")
    head = model.get_output_embeddings()
    x = torch.randn(5, head.in_features)
    ctx = cpu_packed_head(model)
    with ctx, torch.no_grad():
        before = head(x)
        packed = ctx.packed_weight()
        assert ctx.packed_weight() is packed  # unchanged weight: packed once
        head.weight.add_(0.5)  # what an optimizer step does
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight, head.bias), **TOL)
        assert not torch.allclose(head(x), before)
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight))
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight, head.bias), **TOL)
    with ctx:
        out = head(x)  # grad mode, the weight requires grad: the packed forward, F.linear's backward
        assert out.requires_grad
        out.sum().backward()
        torch.testing.assert_close(head.weight.grad, torch.ones(x.shape[0], head.out_features).t() @ x, **TOL)
