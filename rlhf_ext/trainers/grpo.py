"""GRPOTrainer, a drop-in for TRL's GRPOTrainer: the critic-free trainer (rlhf_ext.trainers.critic_free, where the
whole loop reads top to bottom) with GRPOConfig. Per prompt, `num_generations` completions; the advantage of each
is its reward minus the mean of its group, divided by the group's std (`scale_rewards`), and the loss is the clipped
ratio objective plus beta times the k3 KL to the reference. `advantage_estimator` selects RLOO or REINFORCE++ instead.
"""

from rlhf_ext.trainers.critic_free import CriticFreeTrainer
from rlhf_ext.trainers.grpo_config import GRPOConfig

__all__ = ["GRPOConfig", "GRPOTrainer"]


class GRPOTrainer(CriticFreeTrainer):
    """`GRPOTrainer(model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
    reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None)`.

    model: a causal LM or a local path. reward_funcs: a callable `f(prompts, completions, **columns) ->
    list[float | None]`, a sequence-classification reward model (object or local path), or a list mixing them.
    """

    config_class = GRPOConfig
