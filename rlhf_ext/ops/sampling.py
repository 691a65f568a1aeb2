"""Fused sampler: temperature, top-k, top-p, min-p and the draw in one kernel, without sorting the vocabulary.

Filter order (what `reference.filtered_probs_reference` implements with sorts, as Hugging Face does):
  1. temperature: z = logits / T (float32). T == 0 means greedy for that row.
  2. top-k: keep tokens whose value is >= the k-th largest (every token tied with it stays).
  3. top-p on the renormalised top-k set K: keep token i iff the K-mass of tokens strictly above it is
     < top_p * mass(K) -- the smallest high-probability prefix reaching top_p, plus its ties.
  4. min-p: keep token i iff exp(z_i - max z) >= min_p (probability relative to the most likely token).
The token is drawn from the renormalised kept distribution. -inf logits are never drawn.

Log-probs: `logprobs` is log_softmax(z)[token], the unfiltered tempered distribution -- what the trainer
recomputes from the policy's logits, so on-policy importance ratios start at 1. With
`return_filtered_logprobs=True` the log-prob under the renormalised filtered distribution (the one the token
was actually drawn from) comes third. Greedy rows: the first argmax, `logprobs` = log_softmax(logits)[token]
(the T = 1 convention) and a filtered log-prob of 0.

Randomness: one Philox4x32-10 stream keyed by a seed drawn from `generator` (or torch's default generator for
the device), with the row as counter, so a seeded generator gives the same tokens for any thread count.
On CUDA the seed/offset come from the CUDA generator's Philox state, which under CUDA-graph capture is read
from device tensors, so a decode step can be captured and replayed.
"""

from typing import Optional, Union

import torch

from rlhf_ext.ops._common import check_devices

Number = Union[int, float]
_INT64_MAX = 2**63 - 1


@torch.library.register_fake("rlhf_ext::sample")
def _sample_fake(logits, temperature, top_k, top_p, min_p, row_temperature, row_top_k, row_top_p, row_min_p, generator):
    B = logits.shape[0]
    return (
        logits.new_empty((B,), dtype=torch.long),
        logits.new_empty((B,), dtype=torch.float32),
        logits.new_empty((B,), dtype=torch.float32),
    )


def _split(value, name: str, batch: int, device, integral: bool):
    """A scalar setting stays a Python number; a tensor becomes the per-row override `[B]` on logits' device."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise RuntimeError(
                f"{name}: expected a tensor on {device} (the device of logits) or a Python number, "
                f"got one on {value.device}"
            )
        if value.dim() == 0:
            value = value.item()
        else:
            if value.shape != (batch,):
                raise ValueError(
                    f"{name}: expected a scalar or a per-row tensor of shape [{batch}], got {tuple(value.shape)}"
                )
            if integral and value.is_floating_point():
                raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
            return (0 if integral else 1.0), value.to(device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python number or a tensor, got {type(value).__name__}")
    if integral and not float(value).is_integer():
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if integral and not -_INT64_MAX - 1 <= int(value) <= _INT64_MAX:
        # The kernel takes an int64; a larger value would fail in the conversion without naming the argument.
        raise ValueError(f"{name}: expected an integer in [0, 2**63 - 1] (0 = off), got {value!r}")
    return (int(value) if integral else float(value)), None


def _check_rows(name: str, t: Optional[torch.Tensor], ok, expected: str) -> None:
    # Per-row values are checked here on CUDA (the CPU kernel checks its own); skipped under graph capture,
    # where reading them back would be a synchronisation.
    if t is None or t.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    bad = ~ok(t)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected values {expected}, got {t[row].item()} in row {row}")


_SETTINGS = (
    ("temperature", False, lambda t: torch.isfinite(t) & (t >= 0), ">= 0 and finite"),
    ("top_k", True, lambda t: t >= 0, ">= 0 (0 = off)"),
    ("top_p", False, lambda t: (t > 0) & (t <= 1), "in (0, 1] (1 = off)"),
    ("min_p", False, lambda t: (t >= 0) & (t <= 1), "in [0, 1] (0 = off)"),
)


def prepare_settings(
    batch: int,
    device,
    temperature: Union[Number, torch.Tensor] = 1.0,
    top_k: Union[int, torch.Tensor] = 0,
    top_p: Union[Number, torch.Tensor] = 1.0,
    min_p: Union[Number, torch.Tensor] = 0.0,
) -> dict:
    """The settings of repeated `sample` calls on `[batch, V]` logits on `device`, checked once: a scalar (a
    0-dim tensor too) becomes a Python number, a per-row tensor `[batch]` is moved to `device` once. `sample(
    logits, **prepare_settings(...))` then reads nothing back to the host and copies nothing from pageable
    memory, so it can run inside a captured CUDA graph (a decode step)."""
    device = torch.device(device)
    prepared = {}
    for (name, integral, ok, expected), value in zip(_SETTINGS, (temperature, top_k, top_p, min_p)):
        scalar, row = _split(value, name, batch, device, integral)
        _check_rows(name, row, ok, expected)
        prepared[name] = scalar if row is None else row
    return prepared


def sample(
    logits: torch.Tensor,
    temperature: Union[Number, torch.Tensor] = 1.0,
    top_k: Union[int, torch.Tensor] = 0,
    top_p: Union[Number, torch.Tensor] = 1.0,
    min_p: Union[Number, torch.Tensor] = 0.0,
    generator: Optional[torch.Generator] = None,
    return_filtered_logprobs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Draw one token per row of `logits` `[B, V]` (float32/bf16/fp16).

    temperature, top_k, top_p, min_p: Python scalars or per-row tensors `[B]`. temperature 0 = greedy,
    top_k 0 = off, top_p 1 = off, min_p 0 = off. Returns `(tokens int64 [B], logprobs float32 [B])`, plus
    `filtered_logprobs float32 [B]` with `return_filtered_logprobs=True` (see the module docstring).
    Raises on NaN or +inf logits, on a row that is entirely -inf, and on settings out of range.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor [B, V], got {type(logits).__name__}")
    check_devices("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-d tensor [B, V], got shape {tuple(logits.shape)}")
    B, device = logits.shape[0], logits.device
    t_val, t_row = _split(temperature, "temperature", B, device, integral=False)
    k_val, k_row = _split(top_k, "top_k", B, device, integral=True)
    p_val, p_row = _split(top_p, "top_p", B, device, integral=False)
    m_val, m_row = _split(min_p, "min_p", B, device, integral=False)
    for (name, _, ok, expected), row in zip(_SETTINGS, (t_row, k_row, p_row, m_row)):
        _check_rows(name, row, ok, expected)
    tokens, logprobs, filtered = torch.ops.rlhf_ext.sample(
        logits.detach(), t_val, k_val, p_val, m_val, t_row, k_row, p_row, m_row, generator
    )
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        # The CUDA kernel cannot raise: it marks a row it could not sample with token -1.
        bad = tokens < 0
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raw = logits[row]
            if not bool((raw.isnan() | raw.isposinf()).any()) and bool((raw > float("-inf")).any()):
                # The logits are fine: logits / temperature overflowed (as the CPU kernel reports it).
                t = t_row[row].item() if t_row is not None else t_val
                raise ValueError(
                    f"temperature: expected 0 (greedy) or a value large enough that logits / temperature "
                    f"is finite in float32, got {t} in row {row}"
                )
            raise ValueError(f"logits: row {row} contains NaN or +inf, or has no finite logit; nothing can be sampled")
    if return_filtered_logprobs:
        return tokens, logprobs, filtered
    return tokens, logprobs


def bench_cases():
    """Shapes for `rlhf-ext bench`: the fused sampler against sort-based top-k/top-p + torch.multinomial."""
    from rlhf_ext.ops.reference import sample_reference

    B, V = 64, 32000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 4
    return [
        (
            "sample top-k/top-p fwd",
            f"{B}x{V}",
            lambda: sample(logits, 1.0, top_k=50, top_p=0.9),
            lambda: sample_reference(logits, 1.0, top_k=50, top_p=0.9),
        ),
        (
            "sample plain fwd",
            f"{B}x{V}",
            lambda: sample(logits, 1.0),
            lambda: sample_reference(logits, 1.0),
        ),
    ]
