"""Hugging Face models as rlhf_ext uses them: `introspect` (the one place that inspects a model: peft unwrapping,
backbone, lm_head / score head, logit scale and softcap, position ids), `logprobs` (`sequence_logprobs`), `heads`
(reward scores, critic values, the shared value head) and `tiny` (tiny models and a tokenizer for tests and demos).
"""

from rlhf_ext.models.heads import (
    ValueHead,
    causal_lm_token_logprobs,
    critic_from_causal_lm,
    last_token_index,
    logprobs_and_values,
    sequence_scores,
    token_values,
)
from rlhf_ext.models.introspect import (
    backbone,
    hidden_states,
    linear_lm_head,
    lm_head,
    logit_transform,
    position_ids_from_mask,
    score_head,
    unwrap,
)
from rlhf_ext.models.logprobs import sequence_logprobs

__all__ = [
    "ValueHead",
    "backbone",
    "causal_lm_token_logprobs",
    "critic_from_causal_lm",
    "hidden_states",
    "last_token_index",
    "linear_lm_head",
    "lm_head",
    "logit_transform",
    "logprobs_and_values",
    "position_ids_from_mask",
    "score_head",
    "sequence_logprobs",
    "sequence_scores",
    "token_values",
    "unwrap",
]
