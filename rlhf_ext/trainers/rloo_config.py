"""RLOOConfig: GRPOConfig with RLOO's defaults (TRL's RLOOConfig names); see rlhf_ext.trainers.rloo."""

from dataclasses import dataclass, field

from rlhf_ext.trainers.grpo_config import GRPOConfig


@dataclass
class RLOOConfig(GRPOConfig):
    """GRPOConfig with RLOO's defaults (TRL's RLOOConfig names)."""

    advantage_estimator: str = field(default="rloo", metadata={"help": "rloo (see GRPOConfig for the others)"})
    beta: float = field(
        default=0.05, metadata={"help": "KL coefficient of the sequence-level KL folded into the reward"}
    )
    num_generations: int = field(
        default=2, metadata={"help": "completions per prompt (>= 2 for the leave-one-out baseline)"}
    )
