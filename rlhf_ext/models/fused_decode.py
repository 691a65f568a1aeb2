"""CPU decode steps of Llama-family Hugging Face models as one op per step (`rlhf_ext.ops.decode_step`).

A decode step of a small model on the CPU is mostly overhead: per layer ~60 eager ops and module calls around
seven small matrix products. `FusedDecoder.for_model(model)` returns a decoder that runs the whole backbone step
as one op against weights packed once (q/k/v and gate/up each as one product), then the lm_head through
`packed_linear`; or None when the model is not one whose maths the op reproduces — then `generate` keeps the
model's own forward. Supported: `LlamaForCausalLM` and `MistralForCausalLM` without sliding windows, float32 on
the CPU, plain `nn.Linear` projections without biases (no peft adapters), SiLU MLPs, no logit scale, no module
hooks. The rotary embedding stays the model's own module (one call per step, every rope type). Same maths as the
model's forward, to float rounding. An FSDP2-sharded model qualifies while its weights are gathered (plain full
tensors: the trainers sample inside `gathered()`); its sharded parameters alone do not.
"""

from typing import Optional

import torch
from torch import nn

from rlhf_ext.models.introspect import cpu_packed_head, dropout_active, logit_transform, unwrap

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is None and "forward" not in vars(module)


def _rms_norm(module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _class_name(module) -> str:
    """The transformers class name, also under FSDP2, which swaps the class for a subclass FSDP<name>."""
    return next((c.__name__ for c in type(module).__mro__ if c.__name__ in SUPPORTED), type(module).__name__)


def _foreign_hooks(module) -> bool:
    """Forward hooks other than FSDP2's own (whose all-gathers a gathered model, full weights, does not need)."""
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    return any(not getattr(h, "__qualname__", "").startswith("FSDPState.") for h in hooks)


def why_not_fused(model: nn.Module) -> Optional[str]:
    """None when `FusedDecoder` reproduces `model`'s decode step; else the first reason it does not."""
    inner = unwrap(model)
    name = _class_name(inner)
    if name not in SUPPORTED:
        return f"{name} is not one of {SUPPORTED}"
    config = inner.config
    body = getattr(inner, "model", None)
    if body is None or not all(hasattr(body, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return "no Llama-style body (embed_tokens, rotary_emb, layers, norm)"
    params = list(inner.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 or type(p.data) is not torch.Tensor for p in params):
        return "not every parameter is a plain float32 CPU tensor"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "sliding_window", None) is not None:
        return "not a SiLU MLP with full attention"
    if inner.training and dropout_active(inner):
        return "dropout is active"
    if logit_transform(inner) != (1.0, None) or cpu_packed_head(inner).head is None:
        return "the lm_head is not a plain float32 nn.Linear without a logit transform"
    if type(body.embed_tokens) is not nn.Embedding or not _rms_norm(body.norm):
        return "the embedding or the final norm is not the stock module"
    layers = body.layers[: config.num_hidden_layers]
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(_plain_linear(p) for p in projections):
            return "a projection is not a plain nn.Linear without bias (peft adapter, bias, patched forward)"
        if not (_rms_norm(layer.input_layernorm) and _rms_norm(layer.post_attention_layernorm)):
            return "a layer norm is not an RMSNorm"
        if getattr(attn, "head_dim", None) is None or getattr(attn, "scaling", None) is None:
            return "an attention module without head_dim / scaling"
    if any(_foreign_hooks(m) for m in inner.modules()):
        return "a module carries forward hooks"
    return None


class FusedDecoder:
    """Decode steps of one model for one rollout: the weights are packed when it is built (build one per rollout;
    a model updated afterwards needs a new one), `load_cache` takes the prompt's keys and values from the
    transformers cache the prefill filled, and each `step` feeds one token per row and returns the logits."""

    def __init__(self, model: nn.Module, head: Optional[cpu_packed_head] = None):
        from rlhf_ext.ops.decode_step import pack_decoder_layer

        inner = unwrap(model)
        config = inner.config
        body = inner.model
        layers = body.layers[: config.num_hidden_layers]
        first = layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = first.head_dim
        self.scaling = float(first.scaling)
        self.eps = float(body.norm.variance_epsilon)
        self.embed, self.rotary = body.embed_tokens, body.rotary_emb
        self.weights = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.weights += pack_decoder_layer(
                layer.input_layernorm.weight,
                attn.q_proj.weight,
                attn.k_proj.weight,
                attn.v_proj.weight,
                attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                mlp.gate_proj.weight,
                mlp.up_proj.weight,
                mlp.down_proj.weight,
            )
        self.final_norm = body.norm.weight.detach()
        self.head = head if head is not None else cpu_packed_head(inner)  # the caller's, to pack the lm_head once
        self.layers = len(layers)
        self.keys = self.values = self.key_mask = None

    @classmethod
    def for_model(cls, model: nn.Module, head: Optional[cpu_packed_head] = None) -> Optional["FusedDecoder"]:
        """A decoder for `model` (`head`: its open `cpu_packed_head`, if any), or None where `why_not_fused` gives a
        reason."""
        return cls(model, head) if why_not_fused(model) is None else None

    def load_cache(self, kv_cache, prompt_mask: torch.Tensor, capacity: int) -> bool:
        """Copy the prompt's keys and values (slots 0 .. P - 1 of each layer of a transformers cache) into buffers
        for `capacity` slots; key_mask marks the prompt's real tokens and every later slot. False (nothing kept)
        when the cache is not one plain keys/values pair [B, kv_heads, P, head_dim] per layer."""
        B, P = prompt_mask.shape
        layers = getattr(kv_cache, "layers", None)
        shape = (B, self.kv_heads, P, self.head_dim)
        if layers is None or len(layers) != self.layers:
            return False
        if not all(tuple(getattr(layer, "keys", torch.empty(0)).shape) == shape for layer in layers):
            return False
        if not all(tuple(getattr(layer, "values", torch.empty(0)).shape) == shape for layer in layers):
            return False
        full = (self.layers, B, self.kv_heads, capacity, self.head_dim)
        self.keys, self.values = torch.empty(full), torch.empty(full)
        for i, layer in enumerate(layers):
            self.keys[i, :, :, :P] = layer.keys
            self.values[i, :, :, :P] = layer.values
        self.key_mask = torch.ones(B, capacity, dtype=torch.bool)
        self.key_mask[:, :P] = prompt_mask.bool()
        return True

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits `[B, V]` for tokens `[B]` at positions `[B, 1]`, writing cache slot `slot`."""
        from rlhf_ext.ops.decode_step import decode_step

        hidden = self.embed(tokens)  # (B, H)
        cos, sin = self.rotary(hidden[:, None], positions)  # (B, 1, D) each
        hidden = decode_step(
            hidden,
            cos[:, 0],
            sin[:, 0],
            self.keys,
            self.values,
            self.key_mask,
            slot,
            self.weights,
            self.final_norm,
            self.num_heads,
            self.eps,
            self.scaling,
        )
        with self.head:
            return self.head.head(hidden)
