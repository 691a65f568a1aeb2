"""Parts of TRL's PPOTrainer API that scripts written for TRL rely on and that are not the algorithm:
`trainer.model` (the policy and the critic as one module) and the data_collator TRL's scripts pass."""

from typing import Optional

import torch
from torch import nn

from rlhf_ext.models.heads import hidden_states, position_ids_from_mask, score_head


def check_data_collator(data_collator):
    """TRL's default collator (DataCollatorWithPadding) pads prompts, as PPOTrainer does itself; refuse others."""
    from transformers import DataCollatorWithPadding

    if data_collator is None:
        return
    plain = (
        isinstance(data_collator, DataCollatorWithPadding)
        and data_collator.padding in (True, "longest")
        and data_collator.max_length is None
        and data_collator.pad_to_multiple_of is None
    )
    if not plain:
        raise ValueError(
            f"data_collator: only None or a default transformers.DataCollatorWithPadding is supported "
            f"(PPOTrainer left-pads the prompts itself), got {data_collator!r}"
        )


class PolicyAndValue(nn.Module):
    """`trainer.model`, as in TRL: the policy and the critic in one module (parameters, state_dict, train/eval).
    `forward(input_ids, attention_mask)` returns (the policy's output, values [B, L] at every position)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module, shared_critic: bool):
        super().__init__()
        self.policy, self.value_model, self.shared_critic = policy, value_model, shared_critic
        self.config = policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        kwargs.setdefault("position_ids", position_ids_from_mask(attention_mask))  # left padding needs them
        output = self.policy(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.shared_critic:  # the value head reads the policy's last hidden states
            return output, self.value_model(hidden_states(self.policy, input_ids, attention_mask))
        hidden = hidden_states(self.value_model, input_ids, attention_mask)  # (B, L, H)
        return output, score_head(self.value_model)(hidden)[..., 0].float()
