"""PPOConfig: TRL's PPOConfig field names, defaults and batch arithmetic, plus our extras (marked "extra").

Batch layout (TRL's): one PPO step samples `local_batch_size = per_device_train_batch_size *
gradient_accumulation_steps` prompts per process (`batch_size` = that times the processes) and splits them
into `num_mini_batches` minibatches of `local_mini_batch_size` prompts per process. Each minibatch is one
optimizer step, its gradient accumulated over micro-batches of `per_device_train_batch_size` prompts.
`num_total_batches` = ceil(total_episodes / batch_size) PPO steps (unless `max_steps` is set).
TRL options we do not implement are declared with TRL's defaults and refused by name when changed.
"""

import math
from dataclasses import dataclass
from typing import Optional

from rlhf_ext.trainers.base_config import (
    PolicyGradientConfig,
    option,
    require,
    unsupported,
)


@dataclass
class _UnsupportedTRLOptions:
    """TRL PPOConfig fields we accept only at their default, so a TRL script fails loudly, naming them."""

    model_adapter_name: Optional[str] = unsupported(
        None, "several PEFT adapters on one model; the policy trains its only adapter"
    )
    ref_adapter_name: Optional[str] = unsupported(
        None, "a second PEFT adapter as the reference; with LoRA the reference is the policy with its adapter disabled"
    )
    ds3_gather_for_generation: bool = unsupported(
        True, "DeepSpeed ZeRO-3; under FSDP the policy's weights are always gathered for generation"
    )


@dataclass
class PPOConfig(PolicyGradientConfig, _UnsupportedTRLOptions):
    """Config of PPOTrainer (TRL field names; the extras are marked)."""

    unsupported_trl_options = _UnsupportedTRLOptions

    learning_rate: float = option(3e-6, "AdamW learning rate (policy and critic)")
    num_mini_batches: int = option(1, "minibatches each step's prompts are split into (one optimizer step each)")
    num_ppo_epochs: int = option(4, "passes over each rollout batch")
    total_episodes: Optional[int] = option(
        None, "prompts to train on (PPOTrainer sets it to num_train_epochs * len(dataset) when None)"
    )
    num_sample_generations: int = option(10, "times to write eval samples to samples.jsonl (0: never)")
    response_length: int = option(53, "max new tokens per completion")
    max_completion_length: Optional[int] = option(None, "GRPO's name for response_length (overrides it)")
    max_prompt_length: Optional[int] = option(None, "extra: keep the last N prompt tokens")
    stop_token: Optional[str] = option("eos", "'eos': stop at the tokenizer's EOS; None: only stop_token_id")
    stop_token_id: Optional[int] = option(None, "token id that ends a completion")
    temperature: float = option(0.7, "sampling temperature (log-probs use the same)")
    top_k: int = option(0, "extra: top-k sampling (0: off)")
    top_p: float = option(1.0, "extra: nucleus sampling")
    min_p: float = option(0.0, "extra: min-p sampling")
    missing_eos_penalty: Optional[float] = option(None, "subtracted from the score of completions without EOS")
    reward_weights: Optional[list[float]] = option(None, "weights of [reward_model, *reward_funcs]")
    normalize_rewards: bool = option(False, "extra: standardise the scores over the batch")
    reward_clip: Optional[float] = option(None, "extra: clip scores to [-c, c] (after normalising)")
    whiten_rewards: bool = option(False, "whiten the per-token rewards (scale only)")
    kl_coef: float = option(0.05, "KL penalty coefficient (the initial one with target_kl)")
    kl_estimator: str = option("k1", "per-token KL estimator: 'k1' or 'k3'")
    target_kl: Optional[float] = option(None, "adaptive KL: target per-sequence KL (None: fixed kl_coef)")
    kl_horizon: int = option(10000, "adaptive KL: horizon in episodes")
    cliprange: float = option(0.2, "policy ratio clip")
    cliprange_value: float = option(0.2, "value clip around the rollout values")
    vf_coef: float = option(0.1, "value loss weight")
    entropy_coef: float = option(0.0, "extra: entropy bonus weight")
    gamma: float = option(1.0, "discount")
    lam: float = option(0.95, "GAE lambda")
    early_stop_kl: Optional[float] = option(
        None, "extra: end a step's updates once a minibatch's approx KL exceeds this"
    )
    shared_critic: bool = option(False, "extra: value head on the policy instead of a separate critic")
    # TRL's example script reads these two to load its models; PPOTrainer itself takes the models as arguments.
    sft_model_path: str = option(
        "EleutherAI/pythia-160m", "the policy's path, for scripts (TRL's field; the trainer takes `model`)"
    )
    reward_model_path: str = option(
        "EleutherAI/pythia-160m", "the reward model's path, for scripts (TRL's field; the trainer takes `reward_model`)"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.max_completion_length is not None:
            self.response_length = self.max_completion_length
        for name in (
            "num_mini_batches",
            "num_ppo_epochs",
            "response_length",
            "kl_horizon",
        ):
            require(self, name, getattr(self, name) >= 1, "an integer >= 1")
        require(
            self,
            "num_mini_batches",
            self.local_batch_size % self.num_mini_batches == 0,
            f"a divisor of local_batch_size = per_device_train_batch_size x gradient_accumulation_steps = "
            f"{self.local_batch_size} (the prompts of one step, split into num_mini_batches minibatches)",
        )
        require(self, "num_sample_generations", self.num_sample_generations >= 0, "an integer >= 0")
        require(self, "total_episodes", self.total_episodes is None or self.total_episodes >= 1, "None or >= 1")
        require(self, "stop_token", self.stop_token in (None, "eos"), "'eos' or None")
        require(self, "kl_coef", self.kl_coef >= 0, "a value >= 0")
        require(self, "kl_estimator", self.kl_estimator in ("k1", "k3"), "'k1' or 'k3'")
        require(self, "target_kl", self.target_kl is None or self.target_kl > 0, "None or a value > 0")
        require(self, "cliprange", 0.0 < self.cliprange < 1.0, "a value in (0, 1)")
        require(self, "cliprange_value", self.cliprange_value > 0, "a value > 0")
        require(self, "vf_coef", self.vf_coef >= 0, "a value >= 0")
        require(self, "entropy_coef", self.entropy_coef >= 0, "a value >= 0")
        require(self, "gamma", 0.0 <= self.gamma <= 1.0, "a value in [0, 1]")
        require(self, "lam", 0.0 <= self.lam <= 1.0, "a value in [0, 1]")
        require(self, "reward_clip", self.reward_clip is None or self.reward_clip > 0, "None or a value > 0")
        require(self, "early_stop_kl", self.early_stop_kl is None or self.early_stop_kl > 0, "None or a value > 0")

    def completion_limit(self, tokenizer) -> tuple:
        """response_length new tokens at most, ending at stop_token_id, else at the tokenizer's EOS when stop_token
        is 'eos', else only at the length limit."""
        stop = self.stop_token_id
        if stop is None and self.stop_token == "eos":
            stop = tokenizer.eos_token_id
        return self.response_length, stop

    # ---- TRL's batch arithmetic (TRL writes these into args in PPOTrainer.__init__; here they are computed) ----
    @property
    def local_batch_size(self) -> int:
        """Prompts per PPO step and process."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def batch_size(self) -> int:
        """Prompts per PPO step, all processes together."""
        return self.local_batch_size * self.world_size

    @property
    def micro_batch_size(self) -> int:
        """Prompts per forward/backward pass, all processes together."""
        return self.per_device_train_batch_size * self.world_size

    @property
    def local_mini_batch_size(self) -> int:
        """Prompts per optimizer step and process."""
        return self.local_batch_size // self.num_mini_batches

    @property
    def mini_batch_size(self) -> int:
        """Prompts per optimizer step, all processes together."""
        return self.batch_size // self.num_mini_batches

    @property
    def num_total_batches(self) -> Optional[int]:
        """PPO steps for total_episodes (None until total_episodes is known); max_steps > 0 overrides it."""
        return None if self.total_episodes is None else math.ceil(self.total_episodes / self.batch_size)
