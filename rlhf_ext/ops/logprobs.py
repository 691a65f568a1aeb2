"""Token log-probabilities and entropy straight from logits, without a `[..., V]` log-softmax.

`gather_logprobs` reads each logit once (forward) and once more (backward), keeping only O(rows)
statistics; `fused_linear_logprobs` goes one step further and never holds more than one chunk of
rows' logits, recomputing them in the backward (for an lm_head applied to hidden states).
"""

from typing import Optional, Union

import torch

from rlhf_ext.ops._common import check_devices, check_float_dtype, out_float_dtype

_Out = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@torch.library.register_fake("rlhf_ext::logprobs_forward")
def _forward_fake(logits, labels, temperature, ignore_index, with_entropy, inplace_backward):
    rows, dtype = logits.shape[:-1], out_float_dtype(logits.dtype)
    return tuple(logits.new_empty(rows, dtype=dtype) for _ in range(3))


@torch.library.register_fake("rlhf_ext::logprobs_backward")
def _backward_fake(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("rlhf_ext::logprobs_backward_inplace")
def _backward_inplace_fake(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, inplace_backward = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.mark_non_differentiable(lse)
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.with_entropy, ctx.inplace_backward = with_entropy, inplace_backward


def _backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        grad_entropy = None  # the entropy output is all zeros then and carries no gradient
    if grad_logprobs is None and grad_entropy is None:
        return None, None, None, None, None, None
    args = (grad_logprobs, grad_entropy, logits, labels, lse, entropy, ctx.temperature, ctx.ignore_index)
    if ctx.inplace_backward:
        torch.ops.rlhf_ext.logprobs_backward_inplace(*args)
        # The dispatcher does not bump version counters for C++ custom ops: do it, so any other op
        # that saved these logits for its own backward raises instead of reading the gradient.
        torch.autograd.graph.increment_version(logits)
        grad_logits = logits
    else:
        grad_logits = torch.ops.rlhf_ext.logprobs_backward(*args)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("rlhf_ext::logprobs_forward", _backward, setup_context=_setup_context)


def _check_common(labels: torch.Tensor, temperature, ignore_index) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor of token ids, got dtype {labels.dtype}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature: expected a Python float, got {type(temperature).__name__}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected a Python int, got {type(ignore_index).__name__}")
    return labels if labels.dtype == torch.int64 else labels.long()


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> _Out:
    """`log_softmax(logits / temperature)[..., label]` as float32 `[...]` (float64 for float64 logits),
    and with `return_entropy=True` also the entropy of `softmax(logits / temperature)`: `(logprobs, entropy)`.

    logits: `[..., V]` float32/bfloat16/float16/float64 whose last dim is contiguous (other strides,
    e.g. `logits[:, :-1]`, are read in place). labels: `[...]` integer token ids. Rows whose label is
    `ignore_index` give 0 and receive no gradient; any other label outside `[0, V)` raises.

    inplace_backward=True: the backward writes d(loss)/d(logits) over the logits buffer instead of a
    new `[..., V]` tensor, saving one logits-sized allocation. Contract: `logits` must be an
    intermediate (e.g. the lm_head output, not a leaf or a parameter) that nothing else reads after
    this call's backward has run; autograd's version counter catches other ops that saved it.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    labels = _check_common(labels, temperature, ignore_index)
    check_devices("logits", logits, labels=labels)
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "inplace_backward=True writes the gradient into logits, but logits is a leaf tensor that requires "
            "grad (its value would be destroyed); pass the lm_head output, or inplace_backward=False"
        )
    logprobs, entropy, _ = torch.ops.rlhf_ext.logprobs_forward(
        logits, labels, float(temperature), int(ignore_index), bool(return_entropy), bool(inplace_backward)
    )
    return (logprobs, entropy) if return_entropy else logprobs


def _default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    # Size a chunk's logits like the hidden states themselves: rows * V ~ N * H, so the extra memory
    # never dominates what the caller already holds; at least 64 rows keep the matmuls efficient.
    rows_per_chunk = -(-rows * hidden // vocab)
    return max(1, min(rows, max(64, 1 << max(0, rows_per_chunk - 1).bit_length())))


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, with_entropy, chunk_rows):
        rows = hidden.shape[0]
        acc = out_float_dtype(hidden.dtype)
        logprobs = hidden.new_empty(rows, dtype=acc)
        entropy = hidden.new_empty(rows, dtype=acc)
        lse = hidden.new_empty(rows, dtype=acc)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            logits = _chunk_logits(hidden[start:end], weight, bias)  # (chunk, V)
            lp, h, s = torch.ops.rlhf_ext.logprobs_forward(
                logits, labels[start:end], temperature, ignore_index, with_entropy, True
            )
            logprobs[start:end], entropy[start:end], lse[start:end] = lp, h, s
            del logits
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.with_entropy, ctx.chunk_rows = with_entropy, chunk_rows
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, grad_lse):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        # Summed over chunks: accumulate in float32 (float64) even for bf16/fp16 weights.
        acc = out_float_dtype(weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        if grad_logprobs is None and grad_entropy is None:
            grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        else:
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                end = min(start + ctx.chunk_rows, hidden.shape[0])
                h = hidden[start:end]
                grad_logits = _chunk_logits(h, weight, bias)  # recomputed, then overwritten by its gradient
                torch.ops.rlhf_ext.logprobs_backward_inplace(
                    None if grad_logprobs is None else grad_logprobs[start:end],
                    None if grad_entropy is None else grad_entropy[start:end],
                    grad_logits,
                    labels[start:end],
                    lse[start:end],
                    entropy[start:end],
                    ctx.temperature,
                    ctx.ignore_index,
                )
                if need_hidden:
                    torch.mm(grad_logits, weight, out=grad_hidden[start:end])
                if need_weight:
                    if grad_weight.dtype == grad_logits.dtype:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:
                        grad_weight += (grad_logits.t() @ h).to(acc)
                if need_bias:
                    grad_bias += grad_logits.sum(0, dtype=acc)
                del grad_logits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> _Out:
    """`gather_logprobs(hidden @ weight.T + bias, labels, ...)` without materialising the logits.

    hidden: `[..., H]`; weight: `[V, H]` (an lm_head); bias: `[V]` or None; labels: `[...]`.
    Rows are processed `chunk_size` at a time (default: enough rows that a chunk's logits are about
    the size of `hidden`); the backward recomputes each chunk's logits, overwrites them with their
    gradient and accumulates grad_hidden, grad_weight (and grad_bias). Extra memory: O(chunk_size * V).
    Returns float32 log-probs `[...]` (and the entropy with `return_entropy=True`).
    """
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    labels = _check_common(labels, temperature, ignore_index)
    check_devices("hidden", hidden, weight=weight, labels=labels, bias=bias)
    check_float_dtype("hidden", hidden)
    for name, t in (("weight", weight), ("bias", bias)):
        # F.linear would fail on mixed dtypes with a message naming neither argument.
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name}: expected dtype {hidden.dtype} (the dtype of hidden), got {t.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1] if hidden.dim() else '?'}, "
            f"got {list(weight.shape)} (hidden: {list(hidden.shape)})"
        )
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected a hidden size H = hidden.shape[-1] > 0, got shape {list(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected a non-empty vocabulary (V > 0), got shape {list(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {list(hidden.shape[:-1])} (hidden.shape[:-1]), got {list(labels.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape [{weight.shape[0]}] (weight.shape[0]), got {list(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    out_shape = hidden.shape[:-1]
    hidden2d, labels1d = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = hidden2d.shape[0]
    chunk_rows = chunk_size or _default_chunk_rows(rows, hidden2d.shape[1], weight.shape[0])
    logprobs, entropy, _ = _FusedLinearLogprobs.apply(
        hidden2d, weight, bias, labels1d, float(temperature), int(ignore_index), bool(return_entropy), chunk_rows
    )
    logprobs = logprobs.reshape(out_shape)
    return (logprobs, entropy.reshape(out_shape)) if return_entropy else logprobs


def bench_cases():
    """Shapes for `rlhf-ext bench`: the fused kernel against eager log_softmax + gather."""
    from rlhf_ext.ops.reference import gather_logprobs_eager

    N, V = 2048, 32000
    logits = torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    return [
        (
            "gather_logprobs fwd",
            f"{N}x{V} fp32",
            lambda: gather_logprobs(logits, labels),
            lambda: gather_logprobs_eager(logits, labels),
        )
    ]
