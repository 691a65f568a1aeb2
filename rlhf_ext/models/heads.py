"""Scalar heads on Hugging Face backbones: reward scores, critic values, and the shared value head.

Reward models and critics are stock `*ForSequenceClassification(num_labels=1)` models. We run their
backbone and apply the score head ourselves at the positions we choose (HF's own pooling finds "the
last non-pad token" by comparing ids to pad_token_id, which is wrong when pad == eos and the sequence
ends in EOS). Position ids come from the attention mask, so left and right padding both work.
The fused log-prob helpers here (`logprobs_and_values`, `causal_lm_token_logprobs`) follow the one logit rule of
`rlhf_ext.models.introspect.linear_lm_head`: a logit scale is folded into the temperature, a softcap refused.
"""

from typing import Optional

import torch
from torch import nn

from rlhf_ext.models.introspect import (  # noqa: F401  (backbone, score_head: callers import them from here too)
    backbone,
    hidden_states,
    linear_lm_head,
    position_ids_from_mask,
    score_head,
)
from rlhf_ext.ops import fused_linear_logprobs


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B]` index of the last attended position of each row (works for left and right padding)."""
    L = attention_mask.shape[-1]
    return L - 1 - attention_mask.long().flip(-1).argmax(-1)


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B]` float32 scalar score of each sequence, read at its last real token."""
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, L, H)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]  # (B, H)
    return score_head(model)(last)[:, 0].float()


def token_values(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """`[B, R]` float32 critic values for the response tokens `input_ids[:, response_start:]`: the value of
    response token t is read from the hidden state before it (position response_start - 1 + t)."""
    hidden = hidden_states(model, input_ids, attention_mask)[:, response_start - 1 : -1]  # (B, R, H)
    return score_head(model)(hidden)[..., 0].float()


def critic_from_causal_lm(policy: nn.Module) -> nn.Module:
    """A `*ForSequenceClassification(num_labels=1)` critic whose backbone is a copy of the policy's
    and whose score head starts at zero (so the first values are 0)."""
    from transformers import AutoModelForSequenceClassification

    config = policy.config.__class__.from_dict({**policy.config.to_dict(), "num_labels": 1})
    critic = AutoModelForSequenceClassification.from_config(config).to(
        device=next(policy.parameters()).device, dtype=next(policy.parameters()).dtype
    )
    backbone(critic).load_state_dict(backbone(policy).state_dict())
    nn.init.zeros_(score_head(critic).weight)
    return critic


class ValueHead(nn.Linear):
    """`[..., H] -> [...]` value head on the policy's hidden states (shared critic); starts at zero."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype))[..., 0].float()  # a bf16 policy, fp32 head


def logprobs_and_values(
    policy: nn.Module,
    value_head: ValueHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
):
    """One policy forward for a shared critic: response log-probs `[B, R]` (and entropy) through the
    fused linear+log-softmax op on the hidden states (no `[B, R, V]` logits), values `[B, R]` from
    `value_head`. Returns (logprobs, entropy or None, values)."""
    weight, bias, fused_temperature = linear_lm_head(policy, temperature)  # a logit scale folded in
    hidden = hidden_states(policy, input_ids, attention_mask)[:, response_start - 1 : -1]  # (B, R, H)
    out = fused_linear_logprobs(
        hidden,
        weight,
        input_ids[:, response_start:],
        bias=bias,
        temperature=fused_temperature,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
    )
    logprobs, entropy = out if return_entropy else (out, None)
    return logprobs, entropy, value_head(hidden)


def policy_values(
    policy: nn.Module, value_head: ValueHead, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """Values `[B, R]` of a shared critic alone: `value_head` on the policy's hidden states, no lm_head (what
    `logprobs_and_values` returns third, without the log-probs)."""
    return value_head(hidden_states(policy, input_ids, attention_mask)[:, response_start - 1 : -1])


def causal_lm_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    fused_linear: bool = True,
) -> torch.Tensor:
    """`[B, L-1]` float32 log-prob of token t+1 given tokens <= t; 0 where `labels[:, 1:]` is -100.
    fused_linear: from the hidden states through the fused op (no `[B, L, V]` logits); else from the
    model's logits through `gather_logprobs`."""
    from rlhf_ext.ops import gather_logprobs

    targets = labels[:, 1:]
    if fused_linear:
        weight, bias, fused_temperature = linear_lm_head(model)  # a logit scale folded in
        hidden = hidden_states(model, input_ids, attention_mask)[:, :-1]  # (B, L-1, H)
        return fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=fused_temperature)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits
    return gather_logprobs(logits[:, :-1], targets)
