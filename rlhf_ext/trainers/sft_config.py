"""SFTConfig: TRL's SFTConfig field names for supervised fine-tuning (see rlhf_ext.trainers.sft)."""

from dataclasses import dataclass
from typing import Optional

from rlhf_ext.trainers.base_config import TrainerConfig, option, require


@dataclass
class SFTConfig(TrainerConfig):
    """Config of SFTTrainer (TRL field names)."""

    learning_rate: float = option(2e-5, "AdamW learning rate")
    max_length: Optional[int] = option(1024, "truncate tokenized examples to this length")
    dataset_text_field: str = option("text", "column with plain text examples")
    completion_only_loss: Optional[bool] = option(
        None, "prompt/completion data: train only on the completion (None means True)"
    )
    assistant_only_loss: bool = option(False, "chat data: train only on assistant turns")
    eos_token: Optional[str] = option(None, "token appended to text examples (default: the tokenizer's EOS)")
    packing: bool = option(False, "not supported (must stay False)")
    padding_free: bool = option(False, "not supported (must stay False)")
    fused_linear_logprobs: bool = option(
        True, "loss from hidden states via the fused op (False: via the model's logits)"
    )

    def __post_init__(self):
        super().__post_init__()
        require(self, "max_length", self.max_length is None or self.max_length >= 2, "None or >= 2")
        require(self, "packing", not self.packing, "False (packing is not supported)")
        require(self, "padding_free", not self.padding_free, "False (padding-free batches are not supported)")
