"""RewardConfig: TRL's RewardConfig field names for reward-model training (see rlhf_ext.trainers.reward)."""

from dataclasses import dataclass
from typing import Optional

from rlhf_ext.trainers.base_config import TrainerConfig, option, require


@dataclass
class RewardConfig(TrainerConfig):
    """Config of RewardTrainer (TRL field names)."""

    learning_rate: float = option(1e-4, "AdamW learning rate")
    max_length: Optional[int] = option(1024, "pairs with a longer side are dropped (with a warning)")
    center_rewards_coefficient: Optional[float] = option(
        None, "weight of mean((r_chosen + r_rejected)^2), which centres rewards on 0"
    )

    def __post_init__(self):
        super().__post_init__()
        require(self, "max_length", self.max_length is None or self.max_length >= 2, "None or >= 2")
        require(
            self,
            "center_rewards_coefficient",
            self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
            "None or >= 0",
        )
