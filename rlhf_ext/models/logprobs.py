"""Per-token log-probs (and entropy) of a response under a Hugging Face causal LM: what every trainer
calls for the policy, the reference model and the old policy.

Only the response positions ever reach the lm_head (logits_to_keep-style slicing), and the log-softmax
is never materialised: the logits go to `gather_logprobs`, or, with `fused_linear=True`, the last
hidden states go to `fused_linear_logprobs` with the model's own lm_head weight, so not even the
`[B, R, V]` logits exist at once.
"""

import inspect
from typing import Optional, Union

import torch

from rlhf_ext.ops.logprobs import fused_linear_logprobs, gather_logprobs

_Out = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as the
    unpadded sequence: `cumsum(mask) - 1`, clamped at 0 on the padding (which is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _unwrap(model):
    """The transformers model under a peft wrapper (adapters stay injected in its modules)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        config = getattr(model, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise ValueError(
                "model: peft prompt-learning adapters (prefix/prompt tuning) add virtual tokens in the wrapper's "
                "forward, which sequence_logprobs bypasses; merge them or use a LoRA-style adapter"
            )
        return model.get_base_model()
    return model


def _logit_transform(model) -> tuple[float, Optional[float]]:
    """(scale, softcap) the model applies after its lm_head: logits = cap * tanh(scale * z / cap)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    return scale, (float(softcap) if softcap is not None else None)


def _lm_head(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    head = model.get_output_embeddings()
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


def _backbone_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None or backbone is model:
        raise ValueError(
            f"model: cannot find the backbone of {type(model).__name__} (base_model_prefix={prefix!r}); "
            "use fused_linear=False"
        )
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, H)


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


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
) -> _Out:
    """Log-probs `[B, R]` (float32) of the tokens `input_ids[:, response_start:]` (R = L - response_start)
    under `model`, each given everything before it; with `return_entropy=True`, `(logprobs, entropy)`
    where entropy[b, t] is that of the next-token distribution the token was drawn from.

    input_ids, attention_mask: `[B, L]`; prompts may be left-padded (positions come from the mask).
    Response positions that are padding get a value too: mask them in the loss. `temperature` divides
    the logits (use the sampling temperature). `fused_linear=True` projects the backbone's last hidden
    states with the model's own lm_head weight (tied embeddings and a bias are respected, a logit
    scale is folded into the temperature; a tanh softcap is refused) in chunks of `chunk_size` rows.
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

    inner = _unwrap(model)
    position_ids = position_ids_from_mask(attention_mask)
    scale, softcap = _logit_transform(inner)
    if fused_linear:
        if softcap is not None:
            raise ValueError(
                f"model: {type(inner).__name__} applies a final logit softcap (tanh), which is not linear in the "
                "hidden states, so fused_linear=True cannot reproduce it; use fused_linear=False"
            )
        weight, bias = _lm_head(inner)
        hidden = _backbone_hidden(inner, input_ids, attention_mask, position_ids)  # (B, L, H)
        hidden = hidden[:, response_start - 1 : L - 1]  # (B, R, H): the states that predict the labels
        return fused_linear_logprobs(
            hidden,
            weight,
            labels,
            bias,
            temperature=temperature / scale,
            return_entropy=return_entropy,
            chunk_size=chunk_size,
        )

    keep = torch.arange(response_start - 1, L - 1, device=input_ids.device)  # (R,)
    if _accepts_logits_to_keep(inner):
        # The model applies its own scale / softcap; only the R needed positions reach its lm_head.
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # (B, R, V)
    else:
        weight, bias = _lm_head(inner)
        hidden = _backbone_hidden(inner, input_ids, attention_mask, position_ids)[:, keep]  # (B, R, H)
        logits = torch.nn.functional.linear(hidden, weight, bias) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    if logits.shape[:2] != (B, R):
        raise RuntimeError(
            f"model: returned logits of shape {list(logits.shape)} for logits_to_keep of {R} "
            f"positions (expected [{B}, {R}, V])"
        )
    # The lm_head output is saved by nothing (its backward needs only its inputs), so the gradient can
    # overwrite it; autograd's version counter would catch a model whose last op saved its output.
    return gather_logprobs(
        logits, labels, temperature=temperature, return_entropy=return_entropy, inplace_backward=logits.requires_grad
    )
