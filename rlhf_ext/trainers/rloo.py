"""RLOO: REINFORCE with a leave-one-out baseline, a drop-in for TRL's (GRPO-style) RLOOTrainer.

`RLOOTrainer` is the critic-free trainer (rlhf_ext.trainers.critic_free, as GRPOTrainer is) with RLOOConfig, whose
`advantage_estimator` is "rloo": per prompt, `num_generations`
completions; the KL to the reference is folded into each completion's reward at the sequence level,
r' = r - beta * sum_t KL_t (`kl_estimator`, k1 by default), and the advantage of a completion is r' minus
the mean r' of the other completions of its prompt. The surrogate is the same clipped ratio objective
(epsilon, epsilon_high, num_iterations, loss_type) with no KL term in the loss. Everything else
(reward functions and models, LoRA, several processes, metrics) is as in GRPOTrainer.
"""

from rlhf_ext.trainers.critic_free import CriticFreeTrainer
from rlhf_ext.trainers.rloo_config import RLOOConfig

__all__ = ["RLOOConfig", "RLOOTrainer"]


class RLOOTrainer(CriticFreeTrainer):
    """`RLOOTrainer(model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
    reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None)`."""

    config_class = RLOOConfig
