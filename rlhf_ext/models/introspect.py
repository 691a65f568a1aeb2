"""What rlhf_ext needs to know about a Hugging Face model, found in one place: the model under a peft wrapper, its
transformer body (backbone), its heads (lm_head, score head), what it does to the logits after the lm_head, and
the position ids of a padded batch.

The one rule for the logits: a model's own forward computes `logits = transform(hidden @ W^T + b)`. A linear
transform (Cohere's `logits * logit_scale`, Granite's `logits / logits_scaling`) is folded into the temperature
of the fused linear log-prob path, so it gives the model's own log-probs; a tanh softcap (Gemma 2/3's
`final_logit_softcapping`) is not linear in the hidden states, so the fused path refuses it and the logits path
(the model's own forward) is the one to use.
"""

import functools
import inspect
from typing import Optional

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, L]` int64 positions that count only real tokens, so a left-padded row sees the same positions as the
    unpadded sequence: `cumsum(mask) - 1`, clamped at 0 on the padding (which is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (adapters stay injected in its modules); other models as
    they are."""
    if not hasattr(model, "get_base_model"):
        return model
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError(
            "model: peft prompt-learning adapters (prefix/prompt tuning) add virtual tokens in the wrapper's "
            "forward, which rlhf_ext's backbone forward bypasses; merge them or use a LoRA-style adapter"
        )
    return model.get_base_model()


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of an HF model (`model.model`, `model.transformer`, ...), without its head."""
    inner = unwrap(model)
    prefix = getattr(inner, "base_model_prefix", "")
    body = getattr(inner, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is inner:
        raise ValueError(
            f"model: cannot find the transformer body of {type(model).__name__} (base_model_prefix={prefix!r}); "
            "expected a Hugging Face *ForCausalLM or *ForSequenceClassification model"
        )
    return body


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states `[B, L, H]` of the backbone (after its final norm); positions come from the mask, so
    left and right padding both work."""
    out = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def score_head(model: nn.Module) -> nn.Module:
    """The `[H] -> [num_labels]` head of a sequence classifier (`score` for decoder LMs)."""
    inner = unwrap(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(
        f"model: {type(model).__name__} has no score head (expected an AutoModelForSequenceClassification "
        "with num_labels=1, e.g. LlamaForSequenceClassification)"
    )


def lm_head(model: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight `[V, H]`, bias `[V]` or None) of a causal LM's output projection (tied embeddings included)."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"model: {type(model).__name__} has no output embeddings (lm_head); it is not a causal LM")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            "model: the lm_head carries a peft adapter, so its .weight is not the full projection; "
            "use fused_linear=False (or merge the adapter)"
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model: the lm_head ({type(head).__name__}) has no [V, H] weight; use fused_linear=False")
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def logit_transform(model: nn.Module) -> tuple[float, Optional[float]]:
    """(scale, softcap) the model applies after its lm_head: logits = cap * tanh(scale * z / cap), or
    scale * z without a cap."""
    inner = unwrap(model)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere, Cohere2: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, (float(softcap) if softcap is not None else None)


def linear_lm_head(model: nn.Module, temperature: float = 1.0) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """(weight, bias, temperature) for the fused linear log-prob path: log_softmax((hidden @ W^T + b) / t)
    equals the model's own log_softmax(logits / temperature), its logit scale folded into t. Refuses a softcap."""
    scale, softcap = logit_transform(model)
    if softcap is not None:
        raise ValueError(
            f"model: {type(unwrap(model)).__name__} applies a final logit softcap (tanh), which is not linear in the "
            "hidden states, so fused_linear=True cannot reproduce it; use fused_linear=False"
        )
    weight, bias = lm_head(model)
    return weight, bias, temperature / scale


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (HF causal LMs: only those positions reach the lm_head)."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


class _PackedHeadLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) whose forward runs packed_linear against `packed` (weight's packed copy); the
    backward is F.linear's own (grad @ weight, grad^T @ x, grad summed), as matrix products."""

    @staticmethod
    def forward(x, weight, bias, packed):
        from rlhf_ext.ops.packed_linear import packed_linear

        return packed_linear(x, packed, weight.shape[0], bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])  # (rows, V)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad_rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b, None


class cpu_packed_head:
    """Context manager: while open, a CPU float32 `nn.Linear` lm_head computes its products with
    `rlhf_ext.ops.packed_linear` against its weight packed on first use (`pack_linear_weight`), and again whenever
    the weight has changed (another tensor, or its in-place version counter moved, as after an optimizer step).
    The packed copy lives as long as this object: build one per rollout (entered around each decode step) or per
    training forward.

    Why: a BLAS runs `[rows, H] x [V, H]^T` far from its peak with few rows, and below it with many. Measured on the
    2-core AVX2 CPU at H = 256, V = 32000: 16 rows (a decode step) F.linear 8.8 ms, MKL's transposed product 5.8
    ms, packed_linear 2.6-2.8 ms; 512 rows (a PPO minibatch's response positions) 80 vs 59 ms; 1024 rows 146 vs
    111 ms; packing the weight ~4 ms. Each logit is one k-ordered sum whatever rows come with it, so a row's logits
    are the same bits however the batch is split (processes, chunks); they match F.linear to float rounding. With
    gradients the backward is F.linear's (`_PackedHeadLinear`). Other heads (peft adapters, CUDA, other dtypes) keep
    F.linear, and so do inputs under CPU autocast; a head whose instance already overrides `forward` is not touched."""

    def __init__(self, model: nn.Module):
        head = unwrap(model).get_output_embeddings() if hasattr(unwrap(model), "get_output_embeddings") else None
        usable = (
            type(head) is nn.Linear
            and head.weight.device.type == "cpu"
            and head.weight.dtype == torch.float32
            and type(head.weight.data) is torch.Tensor  # not a sharded DTensor (FSDP)
            and (head.bias is None or head.bias.dtype == torch.float32)
            and "forward" not in vars(head)
        )
        self.head = head if usable else None
        self._packed = None  # (weight tensor id, data_ptr, version), packed

    def packed_weight(self) -> torch.Tensor:
        """The head's weight packed for packed_linear, repacked when the weight changed since the last pack."""
        from rlhf_ext.ops.packed_linear import pack_linear_weight

        weight = self.head.weight
        key = (id(weight), weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # free the old copy before packing the new one
            with torch.no_grad():
                self._packed = (key, pack_linear_weight(weight))
        return self._packed[1]

    def __enter__(self):
        if self.head is not None:
            from rlhf_ext.ops.packed_linear import packed_linear

            head = self.head

            def forward(x: torch.Tensor) -> torch.Tensor:
                if (
                    x.dtype != torch.float32
                    or x.device.type != "cpu"
                    or x.shape[-1] != head.in_features
                    or torch.is_autocast_enabled("cpu")  # F.linear runs in the autocast dtype there
                ):
                    return nn.functional.linear(x, head.weight, head.bias)
                tensors = (x, head.weight, head.bias)
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
                    return _PackedHeadLinear.apply(x, head.weight, head.bias, self.packed_weight())
                return packed_linear(x, self.packed_weight(), head.out_features, head.bias)

            head.forward = forward
        return self

    def __exit__(self, *exc):
        if self.head is not None:
            del self.head.forward
        return False


def accepts_kwarg(model, name: str) -> bool:
    """Whether the model's forward takes keyword `name`; PEFT wrappers pass **kwargs through to their base model."""
    params = inspect.signature(model.forward).parameters
    if name in params:
        return True
    if hasattr(model, "get_base_model") and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return name in inspect.signature(model.get_base_model().forward).parameters
    return False


class CacheArgs:
    """How the KV cache and its write position are handed to the model's forward.

    transformers >= 5 names the cache `cache` (`past_key_values` is deprecated, removed in 5.40) and keeps the
    write position on the device inside the cache; older versions take `past_key_values` and `cache_position`.
    Where `cache_position` is accepted it is always passed: without it those versions derive it from
    `StaticCache.get_seq_length()`, which counts the non-zero keys of batch row 0 (wrong when row 0 is
    left-padded) and reads it back to the host (a sync, which fails under CUDA-graph capture).
    """

    def __init__(self, model, kv_cache):
        self.cache_name = "cache" if accepts_kwarg(model, "cache") else "past_key_values"
        self.with_position = accepts_kwarg(model, "cache_position")
        self.kv_cache = kv_cache

    def __call__(self, cache_position: torch.Tensor) -> dict:
        """Keyword arguments for a forward writing cache slots `cache_position` (L,) int64 on the model's device."""
        kwargs = {self.cache_name: self.kv_cache, "use_cache": True}
        if self.with_position:
            kwargs["cache_position"] = cache_position
        return kwargs


def prompt_groups(input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Optional[tuple]:
    """Runs of identical consecutive prompts (ids and mask): (first row of each run (G',) int64, each row's run
    (B,) int64), or None when no two neighbours share a prompt (nothing to share)."""
    if input_ids.shape[0] < 2:
        return None
    same = (input_ids[1:] == input_ids[:-1]).all(dim=1) & (prompt_mask[1:] == prompt_mask[:-1]).all(dim=1)  # (B-1,)
    if not bool(same.any()):
        return None
    starts = torch.cat([same.new_ones(1), ~same])  # (B,) True where a new prompt begins
    return starts.nonzero()[:, 0], starts.long().cumsum(0) - 1


def dropout_sites(model: nn.Module) -> list:
    """(module, attribute) of every dropout rate a training-mode forward of `model` reads: `nn.Dropout.p` and the
    float `attention_dropout` HF attention modules hand to SDPA. `dropout_active` reads them and
    `rlhf_ext.trainers.loading.disable_dropout` zeroes them."""
    sites = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            sites.append((module, "p"))
        if isinstance(getattr(module, "attention_dropout", None), float):
            sites.append((module, "attention_dropout"))
    return sites


def dropout_active(model: nn.Module) -> bool:
    """Whether a training-mode forward of `model` drops anything: some `dropout_sites` rate is above 0."""
    return any(getattr(module, name) > 0 for module, name in dropout_sites(model))


@functools.cache
def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that appends into a reserved buffer instead of concatenating: the keys and values it returns
        are views of the buffer's first positions (the same numbers as DynamicLayer's, without copying the whole
        cache at every decode step). The buffer grows geometrically when full. Any other change of `keys` /
        `values` (a batch gather, a crop, a reset) leaves them no longer views of the buffer, and the next update
        starts a new one from them. No-grad use only (the append writes in place). The reserve is `capacity`
        positions when they suffice, else twice what is needed."""

        def __init__(self, capacity: int = 0):
            super().__init__()
            self.capacity = capacity
            self._views = None  # (keys, values) as last returned: views of the buffers
            self._buffers = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self._views is None or self._views[0] is not self.keys or self._views[1] is not self.values:
                self._buffers = None  # keys / values were replaced outside update: rebuild from them
            n = self.keys.shape[-2] if self.keys.numel() else 0
            end = n + key_states.shape[-2]
            if self._buffers is None or end > self._buffers[0].shape[-2]:
                size = self.capacity if self.capacity >= end else 2 * end
                old = (self.keys, self.values) if n else None
                self._buffers = tuple(
                    s.new_empty((*s.shape[:-2], size, s.shape[-1])) for s in (key_states, value_states)
                )
                if old is not None:
                    for buffer, o in zip(self._buffers, old):
                        buffer[..., :n, :].copy_(o)
            for buffer, s in zip(self._buffers, (key_states, value_states)):
                buffer[..., n:end, :].copy_(s)
            self.keys, self.values = (b[..., :end, :] for b in self._buffers)
            self._views = (self.keys, self.values)
            return self.keys, self.values

    return GrowingLayer


def growing_kv_cache(config, capacity: int = 0):
    """A transformers DynamicCache for no-grad decoding whose plain (full-attention) layers append into a buffer
    reserved for `capacity` positions (growing when full) instead of concatenating the whole cache at every step;
    sliding-window and other special layers are kept as DynamicCache builds them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layer_cls = _growing_layer_class()
    cache.layers = [layer_cls(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
