"""One KV-cached decode step of a Llama-style decoder stack on the CPU, as one op (float32).

`decode_step(hidden, cos, sin, key_cache, value_cache, key_mask, slot, weights, final_norm, num_heads, eps,
scaling)` runs B rows of one token each through every layer (RMSNorm, q/k/v, rotary embedding, attention over the
cached slots, o, RMSNorm, SiLU-gated MLP, residuals) and the final RMSNorm, writing each layer's key and value at
cache slot `slot`. `pack_decoder_layer(...)` builds a layer's six weights. The maths of transformers' Llama and
Mistral layers, to float rounding; what it saves is the ~60 eager ops and module calls per layer that a small
model's decode step spends most of its time in. `rlhf_ext.models.fused_decode` drives it from a Hugging Face model.
CPU only: on CUDA the eager step is replayed from a CUDA graph (`generate(cuda_graph=True)`). No gradient.
"""

import torch

from rlhf_ext.ops._common import check_cpu_float32, check_devices
from rlhf_ext.ops.packed_linear import pack_linear_weight


@torch.library.register_fake("rlhf_ext::decode_step")
def _decode_step_fake(
    hidden, cos, sin, key_cache, value_cache, key_mask, slot, weights, final_norm, num_heads, eps, scaling
):
    return hidden.new_empty(hidden.shape)


def pack_decoder_layer(
    input_norm: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    post_norm: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> list:
    """The six tensors `decode_step` takes for one layer, from its nn.Linear weights ([out, in], no biases) and its
    two RMSNorm weights: [input_norm, pack(q; k; v), pack(o), post_norm, pack(gate; up), pack(down)]."""
    named = dict(input_norm=input_norm, q=q, k=k, v=v, o=o, post_norm=post_norm, gate=gate, up=up, down=down)
    check_devices("input_norm", input_norm, **{n: t for n, t in named.items() if n != "input_norm"})
    check_cpu_float32("decode_step", **named)
    if q.dim() != 2:
        raise ValueError(f"q: expected a 2-d weight [heads * head_dim, H], got shape {tuple(q.shape)}")
    H, inter = q.shape[1], gate.shape[0] if gate.dim() == 2 else -1
    expected = dict(
        input_norm=(H,),
        k=(k.shape[0] if k.dim() == 2 else -1, H),
        v=tuple(k.shape),
        o=(H, q.shape[0]),
        post_norm=(H,),
        gate=(inter, H),
        up=(inter, H),
        down=(H, inter),
    )
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            got = list(named[name].shape)
            raise ValueError(f"{name}: expected shape {list(shape)} (from q {list(q.shape)}, k and gate), got {got}")
    with torch.no_grad():
        return [
            input_norm.detach().contiguous(),
            pack_linear_weight(torch.cat([q, k, v]).detach()),
            pack_linear_weight(o.detach()),
            post_norm.detach().contiguous(),
            pack_linear_weight(torch.cat([gate, up]).detach()),
            pack_linear_weight(down.detach()),
        ]


def decode_step(
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_mask: torch.Tensor,
    slot: int,
    weights: list,
    final_norm: torch.Tensor,
    num_heads: int,
    eps: float,
    scaling: float,
) -> torch.Tensor:
    """The final-normed hidden states `[B, H]` after one decode step; writes slot `slot` of both caches.

    hidden: `[B, H]` the fed tokens' embeddings. cos, sin: `[B, head_dim]` their rotary embedding (as the model's
    rotary module returns it for each row's position). key_cache, value_cache: `[layers, B, kv_heads, capacity,
    head_dim]` contiguous, filled up to slot - 1. key_mask: `[B, capacity]` bool, the slots each row attends to
    among 0 .. slot (False: left padding), True at `slot`. weights: `pack_decoder_layer(...)` of each layer, in
    order. final_norm: `[H]`. eps: the RMSNorms' epsilon; scaling: the attention's score scale (head_dim ** -0.5).
    """
    check_devices(
        "hidden",
        hidden,
        cos=cos,
        sin=sin,
        key_cache=key_cache,
        value_cache=value_cache,
        key_mask=key_mask,
        final_norm=final_norm,
    )
    if not isinstance(weights, (list, tuple)) or not all(isinstance(w, torch.Tensor) for w in weights):
        raise TypeError(f"weights: expected a list of tensors (pack_decoder_layer per layer), got {type(weights)}")
    floats = dict(hidden=hidden, cos=cos, sin=sin, key_cache=key_cache, value_cache=value_cache, final_norm=final_norm)
    check_cpu_float32("decode_step", **floats, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask: expected a bool tensor, got {key_mask.dtype}")
    for name, value in (("slot", slot), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, cos, sin, final_norm, *weights)):
        raise RuntimeError(
            "decode_step has no gradient (its weights are packed snapshots for decoding); call it under "
            "torch.no_grad() or pass detached tensors"
        )
    return torch.ops.rlhf_ext.decode_step(
        hidden, cos, sin, key_cache, value_cache, key_mask, slot, list(weights), final_norm, num_heads, eps, scaling
    )


def bench_cases():
    """Shapes for `rlhf-ext bench`: one decode step of the peer benchmark's small Llama (4 layers, hidden 256, 4
    heads / 2 kv heads, intermediate 512), 16 rows at slot 63 of 96, against the same maths as eager ops."""
    from rlhf_ext.ops import reference

    torch.manual_seed(0)
    B, H, heads, kv, D, inter, layers, capacity, slot = 16, 256, 4, 2, 64, 512, 4, 96, 63
    args = _random_step(B, H, heads, kv, D, inter, layers, capacity, slot)
    return [
        (
            "decode_step fwd",
            f"B{B} H{H} L{layers} slot{slot}",
            lambda: decode_step(*args),
            lambda: reference.decode_step_reference(*args),
        )
    ]


def _random_step(B, H, heads, kv, D, inter, layers, capacity, slot, generator=None):
    """Arguments of a decode step with random weights (benchmarks and tests): scaled so activations stay O(1)."""

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    weights = []
    for _ in range(layers):
        weights += pack_decoder_layer(
            1 + 0.1 * randn(H),
            randn(heads * D, H, scale=H**-0.5),
            randn(kv * D, H, scale=H**-0.5),
            randn(kv * D, H, scale=H**-0.5),
            randn(H, heads * D, scale=(heads * D) ** -0.5),
            1 + 0.1 * randn(H),
            randn(inter, H, scale=H**-0.5),
            randn(inter, H, scale=H**-0.5),
            randn(H, inter, scale=inter**-0.5),
        )
    angles = randn(B, D // 2, scale=3.0)
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    key_cache, value_cache = randn(layers, B, kv, capacity, D), randn(layers, B, kv, capacity, D)
    key_mask = torch.ones(B, capacity, dtype=torch.bool)
    for b in range(B):
        key_mask[b, : b % 5] = False  # left padding of b % 5 slots
    return (
        randn(B, H),
        cos,
        sin,
        key_cache,
        value_cache,
        key_mask,
        slot,
        weights,
        1 + 0.1 * randn(H),
        heads,
        1e-6,
        D**-0.5,
    )
