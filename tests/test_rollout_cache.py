"""Rollout engine and the KV cache: a static cache with a left-padded first row, the cache write position handed to
the model, the CUDA-graph decode step (its capture emulated on the CPU: no host sync inside it, static buffers,
advancing positions), and no deprecated cache keyword."""

import contextlib
import inspect
import warnings

import pytest
import torch

import rlhf_ext  # noqa: F401
from rlhf_ext.generation import generate, rollout
from rlhf_ext.ops.sampling import prepare_settings
from tests.rollout_helpers import PAD, VOCAB, forward_logprobs, tiny


def padded_prompts(batch=4, length=8, seed=3):
    """Left-padded prompts whose row 0 is the most padded (a StaticCache counting row 0's keys gets it wrong)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pads in enumerate([5, 0, 2, 3][:batch]):
        mask[row, :pads] = 0
    return ids.masked_fill(mask == 0, PAD), mask


class RecordingLM(torch.nn.Module):
    """A causal LM whose forward takes `cache_position` (as transformers < 5 models do) and records it; it hands
    the cache (and the position, where taken) on under the names the installed transformers uses."""

    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config
        params = inspect.signature(base.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.base_takes_position = "cache_position" in params
        self.calls = []

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        cache_position=None,
        logits_to_keep=0,
    ):
        # A device-side copy (a read-back would be a host sync, which a captured step must not do).
        self.calls.append(None if cache_position is None else (cache_position, cache_position.clone()))
        extra = {"cache_position": cache_position} if self.base_takes_position else {}
        return self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{self.cache_name: cache},
            **extra,
        )


@contextlib.contextmanager
def no_host_sync():
    """What a CUDA-graph capture forbids, made to raise on the CPU: reading a tensor back to the host."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync (item / bool / tolist / cpu) inside the captured decode step")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
            mp.setattr(torch.Tensor, name, refuse)
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        yield


class EmulatedGraph:
    """CUDA-graph semantics on the CPU: capture + first replay run `fn` once; each later replay runs it again on
    the same static inputs and overwrites the captured output tensors in place."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0
        with no_host_sync():
            self.outputs = fn()

    def replay(self):
        self.replays += 1
        if self.replays > 1:
            with no_host_sync():
                for static, fresh in zip(self.outputs, self.fn()):
                    static.copy_(fresh)


@pytest.fixture
def emulated_graphs(monkeypatch):
    graphs = []

    def capture(fn, generator):
        graphs.append(EmulatedGraph(fn))
        return graphs[-1], graphs[-1].outputs

    monkeypatch.setattr(rollout, "_can_capture", lambda device: True)
    monkeypatch.setattr(rollout, "_capture", capture)
    return graphs


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_static_cache_matches_dynamic_with_padded_first_row(kind):
    model = tiny(kind)
    ids, mask = padded_prompts()
    kw = dict(max_new_tokens=10, temperature=0.0, pad_token_id=PAD)
    dynamic = generate(model, ids, mask, cache="dynamic", **kw)
    static = generate(model, ids, mask, cache="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cache_position_is_passed_and_advances(cache):
    model = RecordingLM(tiny("llama")).eval()
    ids, mask = padded_prompts()
    P, new = ids.shape[1], 6
    out = generate(model, ids, mask, max_new_tokens=new, temperature=0.0, pad_token_id=PAD, cache=cache)
    assert out.response_ids.shape[1] == new
    assert [call and call[1].tolist() for call in model.calls] == [list(range(P))] + [[P + t] for t in range(new - 1)]
    reference = generate(tiny("llama"), ids, mask, max_new_tokens=new, temperature=0.0, pad_token_id=PAD)
    assert torch.equal(out.sequences, reference.sequences)


def test_graph_decode_step_has_no_host_sync_and_reads_static_buffers(emulated_graphs):
    model = RecordingLM(tiny("llama")).eval()
    ids, mask = padded_prompts()
    P, new = ids.shape[1], 7
    # A 0-dim temperature and per-row top-k / top-p: the settings a captured sampler call must not read back.
    graphed = generate(
        model,
        ids,
        mask,
        max_new_tokens=new,
        pad_token_id=PAD,
        cache="static",
        cuda_graph=True,
        temperature=torch.tensor(0.0),
        top_k=torch.tensor([0, 5, 1, 9]),
        top_p=torch.tensor([1.0, 0.9, 0.8, 1.0]),
    )
    eager = generate(tiny("llama"), ids, mask, max_new_tokens=new, temperature=0.0, pad_token_id=PAD)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert len(emulated_graphs) == 1 and emulated_graphs[0].replays == new - 2  # steps 2.. replay the capture
    calls = model.calls
    assert [c[1].tolist() for c in calls] == [list(range(P))] + [[P + t] for t in range(new - 1)]
    # The captured calls (the capture and every replay) all read the same static cache_position buffer.
    assert len({id(c[0]) for c in calls[2:]}) == 1


def test_prepare_settings_leaves_nothing_to_read_back():
    settings = prepare_settings(3, "cpu", temperature=torch.tensor(0.5), top_k=torch.tensor([1, 2, 3]), top_p=0.9)
    assert settings["temperature"] == 0.5 and isinstance(settings["temperature"], float)
    assert settings["top_p"] == 0.9 and settings["min_p"] == 0.0
    assert settings["top_k"].device.type == "cpu" and settings["top_k"].tolist() == [1, 2, 3]
    on_meta = prepare_settings(3, "meta", top_p=torch.tensor([0.5, 0.9, 1.0]))
    assert on_meta["top_p"].device.type == "meta"  # moved once, not at every step
    with pytest.raises(ValueError, match="top_k: expected a scalar or a per-row tensor of shape \\[3\\]"):
        prepare_settings(3, "cpu", top_k=torch.tensor([1, 2]))
    logits = torch.randn(3, 11)
    with no_host_sync():
        from rlhf_ext.ops.sampling import sample

        tokens, _ = sample(logits, **prepare_settings(3, "cpu", temperature=0.0, top_k=torch.tensor([1, 2, 3])))
    assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rollout_emits_no_deprecation_warning(cache):
    model = tiny("llama")
    ids, mask = padded_prompts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generate(model, ids, mask, max_new_tokens=4, temperature=0.0, pad_token_id=PAD, cache=cache)


@pytest.mark.cuda
def test_cuda_graph_capture_with_padded_first_row():
    model = tiny("llama").cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    kw = dict(max_new_tokens=12, pad_token_id=PAD)
    dynamic = generate(model, ids, mask, cache="dynamic", temperature=0.0, **kw)
    graphed = generate(model, ids, mask, cache="static", cuda_graph=True, temperature=0.0, **kw)
    assert torch.equal(graphed.sequences, dynamic.sequences)
    # Settings a captured sampler must not read back: a 0-dim temperature, per-row top-k on the host.
    sampled = generate(
        model,
        ids,
        mask,
        cache="static",
        cuda_graph=True,
        temperature=torch.tensor(0.9),
        top_k=torch.tensor([0, 5, 1, 9]),
        generator=torch.Generator("cuda").manual_seed(0),
        **kw,
    )
    m = sampled.response_mask.bool()
    torch.testing.assert_close(sampled.logprobs[m], forward_logprobs(model, sampled, 0.9)[m], atol=1e-3, rtol=1e-3)


def test_growing_cache_layer_holds_what_a_dynamic_layer_holds():
    """Appends (a prefill, decode steps, a buffer that must grow), a batch gather and a crop: the growing layer's
    keys and values equal a plain DynamicLayer's after each; appends within the reserve write in place."""
    from transformers.cache_utils import DynamicLayer

    from rlhf_ext.models.introspect import growing_kv_cache

    gen = torch.Generator().manual_seed(0)
    grow = growing_kv_cache(tiny("llama").config, capacity=8).layers[0]
    plain = DynamicLayer()

    def update(length):
        k, v = (torch.randn(3, 2, length, 4, generator=gen) for _ in range(2))
        out = grow.update(k, v)
        ref = plain.update(k, v)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        assert grow.get_seq_length() == plain.get_seq_length()
        return out[0]

    first = update(5)
    assert grow._buffers[0].shape[-2] == 8  # the reserve asked for, when it suffices
    for _ in range(3):
        assert update(1).data_ptr() == first.data_ptr()  # 6, 7, 8 positions: inside the reserve of 8
    update(1)  # 9 > 8: a new buffer (twice the length), the old positions copied
    for layer in (grow, plain):
        layer.batch_select_indices(torch.tensor([2, 0, 0]))
    update(2)
    for layer in (grow, plain):
        layer.crop(-3)
    update(1)
    update(4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("repeat", [1, 3])
def test_growing_cache_samples_what_a_dynamic_cache_samples(kind, repeat, monkeypatch):
    """generate() with the growing cache draws the same tokens with the same log-prob bits as with transformers'
    own DynamicCache, with and without a shared prefill (repeat 3: runs of identical prompts); gemma2 mixes
    sliding-window layers (kept as DynamicCache builds them) with full ones."""
    from transformers import DynamicCache

    from tests.hf_helpers import tiny_hf

    model = tiny_hf(kind) if kind == "gemma2" else tiny(kind)
    ids, mask = padded_prompts()
    ids, mask = ids.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)

    def run():
        return generate(
            model, ids, mask, max_new_tokens=12, pad_token_id=PAD, generator=torch.Generator().manual_seed(1)
        )

    grown = run()
    monkeypatch.setattr(rollout, "growing_kv_cache", lambda config, capacity=0: DynamicCache(config=config))
    plain = run()
    assert torch.equal(grown.response_ids, plain.response_ids)
    assert torch.equal(grown.logprobs, plain.logprobs)
