"""RLOOConfig: GRPOConfig with RLOO's defaults (TRL's RLOOConfig names); see rlhf_ext.trainers.rloo."""

from dataclasses import dataclass

from rlhf_ext.trainers.base_config import option
from rlhf_ext.trainers.grpo_config import GRPOConfig


@dataclass
class RLOOConfig(GRPOConfig):
    """GRPOConfig with RLOO's defaults (TRL's RLOOConfig names)."""

    advantage_estimator: str = option("rloo", "rloo (see GRPOConfig for the others)")
    beta: float = option(0.05, "KL coefficient of the sequence-level KL folded into the reward")
    num_generations: int = option(2, "completions per prompt (>= 2 for the leave-one-out baseline)")
