"""Float32 linear layers on the CPU against a weight packed once (the lm_head's products).

`pack_linear_weight(weight)` repacks a `[N, K]` weight into panels of 16 output features; `packed_linear(input,
packed, out_features, bias)` is then `F.linear(input, weight, bias)`: 2-3x faster than MKL for a decode step's few
rows, ~1.3x for a training forward's hundreds (see csrc/cpu/packed_linear.cpp for the kernel and its figures).
CPU only: on CUDA these products stay with cuBLAS. No gradient of its own (the packed weight is a snapshot):
`rlhf_ext.models.introspect.cpu_packed_head` runs a CPU lm_head with it, under F.linear's backward when training.
"""

from typing import Optional

import torch

from rlhf_ext.ops._common import check_cpu_float32, check_devices

PANEL = 16  # output features per packed panel (csrc/checks/checks.h kPackedPanel)


def _panels(out_features: int) -> int:
    return (out_features + PANEL - 1) // PANEL


@torch.library.register_fake("rlhf_ext::pack_linear_weight")
def _pack_linear_weight_fake(weight):
    return weight.new_empty((_panels(weight.shape[0]), weight.shape[1], PANEL))


@torch.library.register_fake("rlhf_ext::packed_linear")
def _packed_linear_fake(input, packed, out_features, bias):
    return input.new_empty((input.shape[0], out_features))


def _check_no_grad(**tensors) -> None:
    if torch.is_grad_enabled():
        for name, tensor in tensors.items():
            if tensor is not None and tensor.requires_grad:
                raise RuntimeError(
                    f"{name}: requires grad, but packed_linear has no gradient (the packed weight is a snapshot "
                    "for decoding); call it under torch.no_grad() or pass detached tensors"
                )


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight `[N, K]` float32 (CPU) as `[ceil(N / 16), K, 16]`: panels of 16 output features,
    k-major, the last one zero-padded. Pack once per fixed weight (a rollout); repack after the weight changes."""
    check_devices("weight", weight)
    check_cpu_float32("packed_linear", weight=weight)
    return torch.ops.rlhf_ext.pack_linear_weight(weight.detach())


def packed_linear(
    input: torch.Tensor, packed: torch.Tensor, out_features: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`F.linear(input, weight, bias)` with `packed = pack_linear_weight(weight)`: input `[..., K]` float32 on the
    CPU, output `[..., out_features]` float32. Each output is one sum over k in order (FMA on AVX2), independent
    of the thread count; it matches F.linear to float rounding, not bit for bit."""
    check_devices("input", input, packed=packed, bias=bias)
    check_cpu_float32("packed_linear", input=input, packed=packed, bias=bias)
    if isinstance(out_features, bool) or not isinstance(out_features, int):
        raise TypeError(f"out_features: expected an int, got {type(out_features).__name__}")
    if input.dim() < 1:
        raise ValueError(f"input: expected a tensor [..., in_features], got shape {tuple(input.shape)}")
    _check_no_grad(input=input, packed=packed, bias=bias)
    flat = input.reshape(-1, input.shape[-1])  # (rows, K)
    out = torch.ops.rlhf_ext.packed_linear(flat, packed, out_features, bias)
    return out.view(*input.shape[:-1], out_features)


def bench_cases():
    """Shapes for `rlhf-ext bench`: a decode step's lm_head product against F.linear."""
    rows, hidden, vocab = 16, 256, 32000
    hidden_states, weight = torch.randn(rows, hidden), torch.randn(vocab, hidden)
    packed = pack_linear_weight(weight)
    return [
        (
            "packed_linear fwd (lm_head)",
            f"{rows}x{hidden}x{vocab}",
            lambda: packed_linear(hidden_states, packed, vocab),
            lambda: torch.nn.functional.linear(hidden_states, weight),
        )
    ]
