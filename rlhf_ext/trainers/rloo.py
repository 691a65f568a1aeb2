"""RLOO: REINFORCE with a leave-one-out baseline, a drop-in for TRL's (GRPO-style) RLOOTrainer.

`RLOOTrainer` is `GRPOTrainer` with `advantage_estimator="rloo"`: per prompt, `num_generations`
completions; the KL to the reference is folded into each completion's reward at the sequence level,
r' = r - beta * sum_t KL_t (`kl_estimator`, k1 by default), and the advantage of a completion is r' minus
the mean r' of the other completions of its prompt. The surrogate is the same clipped ratio objective
(epsilon, epsilon_high, num_iterations, loss_type) with no KL term in the loss. Everything else
(reward functions and models, LoRA, several processes, metrics) is GRPOTrainer's.
"""

from dataclasses import dataclass, field

from rlhf_ext.trainers.grpo import GRPOTrainer
from rlhf_ext.trainers.grpo_config import GRPOConfig

__all__ = ["RLOOConfig", "RLOOTrainer"]


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


class RLOOTrainer(GRPOTrainer):
    """`RLOOTrainer(model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
    reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None)`."""

    config_class = RLOOConfig
