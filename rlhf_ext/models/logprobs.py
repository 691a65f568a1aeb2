"""Per-token log-probs (and entropy) of a response under a Hugging Face causal LM: what every trainer
calls for the policy, the reference model and the old policy.

Only the response positions ever reach the lm_head (logits_to_keep-style slicing), and the log-softmax
is never materialised: the logits go to `gather_logprobs`, or, with `fused_linear=True`, the last
hidden states go to `fused_linear_logprobs` with the model's own lm_head weight, so not even the
`[B, R, V]` logits exist at once.
"""

from typing import Optional, Union

import torch
from torch.distributed.tensor import DTensor

from rlhf_ext.models.introspect import (
    CacheArgs,
    accepts_kwarg,
    accepts_logits_to_keep,
    cpu_packed_head,
    dropout_active,
    hidden_states,
    linear_lm_head,
    lm_head,
    logit_transform,
    position_ids_from_mask,
    prompt_groups,
    unwrap,
)
from rlhf_ext.ops.logprobs import fused_linear_logprobs, gather_logprobs

__all__ = ["position_ids_from_mask", "sequence_logprobs"]  # position_ids_from_mask: callers import it from here

_Out = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    fused_linear: bool = False,
    chunk_size: Optional[int] = None,
    share_prompt: bool = False,
) -> _Out:
    """Log-probs `[B, R]` (float32) of the tokens `input_ids[:, response_start:]` (R = L - response_start)
    under `model`, each given everything before it; with `return_entropy=True`, `(logprobs, entropy)`
    where entropy[b, t] is that of the next-token distribution the token was drawn from.

    input_ids, attention_mask: `[B, L]`; prompts may be left-padded (positions come from the mask).
    Response positions that are padding get a value too: mask them in the loss. `temperature` divides
    the logits (use the sampling temperature). `fused_linear=True` projects the backbone's last hidden
    states with the model's own lm_head weight (tied embeddings and a bias are respected, a logit
    scale is folded into the temperature; a tanh softcap is refused) in chunks of `chunk_size` rows.
    `share_prompt=True` (logits path): runs of identical consecutive prompts (GRPO's groups) run their prompt once
    (`shared_prompt_logits`); the same log-probs and gradients up to float rounding. Ignored where it cannot
    apply (no such run, fused_linear, FSDP, gradient checkpointing, active dropout, a model without a KV cache).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [B, L] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {list(input_ids.shape)} (the shape of input_ids), "
            f"got {list(getattr(attention_mask, 'shape', [])) or type(attention_mask).__name__}"
        )
    B, L = input_ids.shape
    if isinstance(response_start, bool) or not isinstance(response_start, int) or not 1 <= response_start <= L:
        raise ValueError(
            f"response_start: expected an int in [1, {L}] (the first response column; the token "
            f"before it conditions the first response token), got {response_start!r}"
        )
    R = L - response_start
    labels = input_ids[:, response_start:]  # (B, R)
    if R == 0:
        empty = torch.zeros(B, 0, dtype=torch.float32, device=input_ids.device)
        return (empty, empty.clone()) if return_entropy else empty

    inner = unwrap(model)
    if fused_linear:
        # The one rule (rlhf_ext.models.introspect): a logit scale is folded into the temperature, a softcap refused.
        weight, bias, fused_temperature = linear_lm_head(inner, temperature)
        hidden = hidden_states(inner, input_ids, attention_mask)[:, response_start - 1 : L - 1]  # (B, R, H)
        return fused_linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            temperature=fused_temperature,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
        )

    keep = torch.arange(response_start - 1, L - 1, device=input_ids.device)  # (R,)
    groups = shared_prompt_groups(model, input_ids, attention_mask, response_start) if share_prompt else None
    if groups is not None:
        # (B, 1, V) and (B, R - 1, V) gathered apart: joining them would copy the whole [B, R, V] logits
        with cpu_packed_head(model):
            parts = shared_prompt_logits(model, input_ids, attention_mask, response_start, groups)
        outs = [_gather(parts[0], labels[:, :1], temperature, return_entropy)]
        if len(parts) == 2:
            outs.append(_gather(parts[1], labels[:, 1:], temperature, return_entropy))
        return tuple(torch.cat(o, 1) for o in zip(*outs)) if return_entropy else torch.cat(outs, 1)
    if accepts_logits_to_keep(inner):
        # The model applies its own scale / softcap; only the R needed positions reach its lm_head (on the CPU as
        # packed_linear: cpu_packed_head).
        with cpu_packed_head(model):
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
                logits_to_keep=keep,
            ).logits  # (B, R, V)
    else:
        scale, softcap = logit_transform(inner)
        weight, bias = lm_head(inner)
        hidden = hidden_states(inner, input_ids, attention_mask)[:, keep]  # (B, R, H)
        logits = torch.nn.functional.linear(hidden, weight, bias) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    if logits.shape[:2] != (B, R):
        raise RuntimeError(
            f"model: returned logits of shape {list(logits.shape)} for logits_to_keep of {R} "
            f"positions (expected [{B}, {R}, V])"
        )
    return _gather(logits, labels, temperature, return_entropy)


def _gather(logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool) -> _Out:
    # The lm_head output is saved by nothing (its backward needs only its inputs), so the gradient can
    # overwrite it; autograd's version counter would catch a model whose last op saved its output.
    return gather_logprobs(
        logits, labels, temperature=temperature, return_entropy=return_entropy, inplace_backward=logits.requires_grad
    )


def shared_prompt_groups(model, input_ids, attention_mask, response_start: int) -> Optional[tuple]:
    """`prompt_groups` of the prompts `input_ids[:, :response_start]` where `shared_prompt_logits` can run on
    `model`, else None: a causal LM that takes `logits_to_keep` and a KV cache, not FSDP-sharded, not under
    gradient checkpointing (which turns the cache off in training) and without active dropout."""
    inner = unwrap(model)
    if any(isinstance(p, DTensor) for p in inner.parameters()):
        # FSDP: every forward gathers the shards collectively, so each process must run as many forwards as the
        # others; whether a process's rows hold runs of one prompt is its own (a process would wait forever)
        return None
    if inner.training and dropout_active(inner):
        return None  # one prompt forward would give every row of a run the same dropout mask
    name = (
        "is_activation_checkpointing"
        if hasattr(type(inner), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(inner, name, False):  # transformers 5 renamed it (the old name warns)
        return None
    if not accepts_logits_to_keep(inner) or not (
        accepts_kwarg(model, "cache") or accepts_kwarg(model, "past_key_values")
    ):
        return None
    return prompt_groups(input_ids[:, :response_start], attention_mask[:, :response_start])


def shared_prompt_logits(model, input_ids, attention_mask, response_start: int, groups: tuple) -> list:
    """Logits of the R = L - response_start response positions as column blocks `[(B, 1, V), (B, R - 1, V)]` (the
    second absent when R = 1), each prompt run once per run of identical consecutive prompts (`groups` =
    prompt_groups(...): first row of each run (G',), run of each row (B,)).

    The prompts' forward fills a KV cache for the G' distinct prompts and gives the logits of each prompt's last
    position (the first response token's); the cache is gathered to the B rows (an index, so gradients from every
    row of a run add up in its prompt's forward) and the responses' forward attends to it. Same positions, masks
    and products per row as the full forward: equal up to float rounding, with the prompt's backbone compute paid
    once per run instead of once per row (GRPO: G times less)."""
    from transformers import DynamicCache

    first, rows_run = groups
    P, L = response_start, input_ids.shape[1]
    positions = position_ids_from_mask(attention_mask)  # (B, L)
    cache = CacheArgs(model, DynamicCache(config=unwrap(model).config))
    device = input_ids.device
    head = model(
        input_ids=input_ids[first, :P],
        attention_mask=attention_mask[first, :P],
        position_ids=positions[first, :P],
        logits_to_keep=1,
        **cache(torch.arange(P, device=device)),
    ).logits[rows_run]  # (B, 1, V) the first response token's logits
    if L - 1 == P:
        return [head]
    cache.kv_cache.batch_select_indices(rows_run)
    rest = model(
        input_ids=input_ids[:, P : L - 1],
        attention_mask=attention_mask[:, : L - 1],
        position_ids=positions[:, P : L - 1],
        logits_to_keep=0,
        **cache(torch.arange(P, L - 1, device=device)),
    ).logits  # (B, R - 1, V)
    return [head, rest]
