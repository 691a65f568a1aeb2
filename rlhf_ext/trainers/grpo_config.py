"""GRPOConfig: TRL's GRPOConfig field names, defaults and checks, plus our few extras (marked "extra").

Batch layout (TRL's): `per_device_train_batch_size` counts completions, not prompts. One generation
round samples `generation_batch_size = per_device_train_batch_size * processes * steps_per_generation`
completions, `num_generations` per prompt; each process then takes `steps_per_generation` micro-batches
from its share, `gradient_accumulation_steps` per optimizer step, `num_iterations` times over.
TRL options we do not implement are declared with TRL's defaults and refused by name when changed.
"""

from dataclasses import dataclass
from typing import Optional

from rlhf_ext.trainers.advantages import ESTIMATORS, SCALE_REWARDS
from rlhf_ext.trainers.base_config import (
    PolicyGradientConfig,
    option,
    require,
    unsupported,
)

# loss_type -> ppo_loss's loss_agg. grpo: mean over sequences of each one's token mean; bnpo: token mean
# of each micro-batch; dapo: token mean over the whole optimizer batch (all micro-batches and processes);
# dr_grpo: token sums / max_completion_length, mean over sequences.
LOSS_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}


@dataclass
class _UnsupportedTRLOptions:
    """TRL GRPOConfig fields we accept only at their default, so a TRL script fails loudly, naming them."""

    use_vllm: bool = unsupported(False, "vLLM generation; rlhf_ext generates with its own KV-cached engine")
    vllm_mode: str = unsupported("server", "vLLM generation")
    vllm_server_base_url: Optional[str] = unsupported(None, "vLLM generation")
    vllm_server_host: str = unsupported("0.0.0.0", "vLLM generation")
    vllm_server_port: int = unsupported(8000, "vLLM generation")
    vllm_server_timeout: float = unsupported(240.0, "vLLM generation")
    vllm_gpu_memory_utilization: float = unsupported(0.3, "vLLM generation")
    vllm_tensor_parallel_size: int = unsupported(1, "vLLM generation")
    vllm_guided_decoding_regex: Optional[str] = unsupported(None, "vLLM generation")
    vllm_enable_sleep_mode: bool = unsupported(False, "vLLM generation")
    vllm_importance_sampling_correction: bool = unsupported(True, "vLLM generation")
    use_transformers_paged: bool = unsupported(False, "paged generation")
    cache_implementation: Optional[str] = unsupported(None, "custom KV caches in generation")
    generation_kwargs: Optional[dict] = unsupported(None, "extra generate() kwargs; use temperature/top_p/top_k/min_p")
    repetition_penalty: float = unsupported(1.0, "repetition penalty in sampling")
    chat_template_kwargs: Optional[dict] = unsupported(None, "chat template kwargs")
    ds3_gather_for_generation: bool = unsupported(True, "DeepSpeed ZeRO-3")
    delta: Optional[float] = unsupported(None, "two-sided clipping")
    importance_sampling_level: str = unsupported("token", "sequence-level (GSPO) importance ratios")
    sync_ref_model: bool = unsupported(False, "reference model syncing (TR-DPO)")
    ref_model_mixup_alpha: float = unsupported(0.6, "reference model syncing")
    ref_model_sync_steps: int = unsupported(512, "reference model syncing")
    top_entropy_quantile: float = unsupported(1.0, "high-entropy token masking")
    use_liger_loss: bool = unsupported(False, "the Liger loss; rlhf_ext uses its own fused ppo_loss")
    cast_lm_head_to_fp32: bool = unsupported(False, "an fp32 LM head")
    wandb_log_unique_prompts: bool = unsupported(False, "wandb logging")


@dataclass
class GRPOConfig(PolicyGradientConfig, _UnsupportedTRLOptions):
    """Config of GRPOTrainer (TRL field names; the extras are marked)."""

    unsupported_trl_options = _UnsupportedTRLOptions

    learning_rate: float = option(1e-6, "AdamW learning rate")
    # data and generation
    max_prompt_length: Optional[int] = option(512, "keep the last N prompt tokens (None: all)")
    num_generations: int = option(8, "completions sampled per prompt (the group size)")
    max_completion_length: int = option(256, "max new tokens per completion")
    shuffle_dataset: bool = option(True, "shuffle the prompts each epoch")
    generation_batch_size: Optional[int] = option(None, "completions per generation round, all processes together")
    steps_per_generation: Optional[int] = option(
        None, "micro-batches per generation round (default gradient_accumulation_steps)"
    )
    temperature: float = option(1.0, "sampling temperature (log-probs use the same)")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: Optional[int] = option(None, "top-k sampling (None or 0: off)")
    min_p: Optional[float] = option(None, "min-p sampling (None or 0: off)")
    # the objective
    beta: float = option(0.0, "KL coefficient (0: no reference model is loaded)")
    num_iterations: int = option(1, "updates per generated batch (mu in the GRPO paper)")
    epsilon: float = option(0.2, "ratio clip (lower, and upper unless epsilon_high)")
    epsilon_high: Optional[float] = option(None, "upper ratio clip (DAPO's clip-higher)")
    reward_weights: Optional[list[float]] = option(None, "weight of each reward function (default 1 each)")
    # typed str like TRL's (HfArgumentParser reads a Union[str, bool] as a bool); True/False still accepted
    scale_rewards: str = option(
        "group", "divide advantages by the std of the 'group', the 'batch', or 'none' (True/False: group/none)"
    )
    loss_type: str = option("dapo", "grpo | bnpo | dapo | dr_grpo: how the token losses are averaged")
    mask_truncated_completions: bool = option(False, "leave completions without EOS out of the loss")
    log_completions: bool = option(False, "print completions and write <output_dir>/completions.jsonl when logging")
    num_completions_to_print: Optional[int] = option(None, "how many completions log_completions prints (None: all)")
    # extras
    advantage_estimator: str = option(
        "grpo", "extra: grpo | rloo | reinforce_pp | reinforce_pp_baseline (see rlhf_ext.trainers.critic_free)"
    )
    kl_estimator: str = option("k1", "extra: KL estimator folded into the reward by rloo / reinforce_pp ('k1' or 'k3')")
    normalize_advantages: bool = option(False, "extra (TRL RLOO's): whiten rloo advantages over the batch")
    generation_chunk_size: Optional[int] = option(
        None, "extra: completions per generate() call (None: a process's whole share)"
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.scale_rewards, bool) or self.scale_rewards in ("True", "False", "true", "false"):
            # TRL's boolean form, as a bool or as a command-line string
            self.scale_rewards = "group" if str(self.scale_rewards).lower() == "true" else "none"
        require(self, "advantage_estimator", self.advantage_estimator in ESTIMATORS, f"one of {ESTIMATORS}")
        require(self, "scale_rewards", self.scale_rewards in SCALE_REWARDS, f"one of {SCALE_REWARDS} (or True/False)")
        require(self, "loss_type", self.loss_type in LOSS_AGG, f"one of {tuple(LOSS_AGG)}")
        require(self, "kl_estimator", self.kl_estimator in ("k1", "k3"), "'k1' or 'k3'")
        min_generations = (
            1
            if self.advantage_estimator.startswith("reinforce_pp")
            and self.advantage_estimator != "reinforce_pp_baseline"
            else 2
        )
        require(
            self,
            "num_generations",
            isinstance(self.num_generations, int) and self.num_generations >= min_generations,
            f"an integer >= {min_generations} with advantage_estimator={self.advantage_estimator!r}",
        )
        require(
            self,
            "max_completion_length",
            self.max_completion_length is not None and self.max_completion_length >= 1,
            "an integer >= 1",
        )
        require(self, "num_iterations", self.num_iterations >= 1, "an integer >= 1")
        require(self, "beta", self.beta >= 0, "a value >= 0")
        require(self, "epsilon", 0.0 < self.epsilon < 1.0, "a value in (0, 1)")
        require(self, "epsilon_high", self.epsilon_high is None or self.epsilon_high > 0, "None or a value > 0")
        require(
            self,
            "generation_chunk_size",
            self.generation_chunk_size is None or self.generation_chunk_size >= 1,
            "None or >= 1",
        )
        require(
            self,
            "num_completions_to_print",
            self.num_completions_to_print is None or self.num_completions_to_print >= 0,
            "None or >= 0",
        )
        self._check_batch_layout()

    def _check_batch_layout(self):
        per_step = self.per_device_train_batch_size * self.world_size  # completions per micro-step, all processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            if (
                self.generation_batch_size != per_step * self.steps_per_generation
            ):  # a config rebuilt from a checked one passes
                raise ValueError(
                    "generation_batch_size and steps_per_generation: set at most one (each determines the other)"
                )
        elif self.generation_batch_size is not None:
            require(
                self,
                "generation_batch_size",
                self.generation_batch_size % per_step == 0,
                f"a multiple of per_device_train_batch_size x processes = {per_step}",
            )
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        require(
            self,
            "steps_per_generation",
            self.steps_per_generation >= 1 and self.steps_per_generation % self.gradient_accumulation_steps == 0,
            f"a multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps}), so that every optimizer "
            "step uses completions of one generation round",
        )
        self.generation_batch_size = per_step * self.steps_per_generation
        if self.generation_batch_size % self.num_generations:
            possible = [g for g in range(2, self.generation_batch_size + 1) if self.generation_batch_size % g == 0]
            raise ValueError(
                f"num_generations: {self.num_generations} does not divide the generation batch of "
                f"{self.generation_batch_size} completions (per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x {self.world_size} processes x steps_per_generation "
                f"{self.steps_per_generation}); with this batch num_generations can be one of {possible}"
            )

    def completion_limit(self, tokenizer) -> tuple:
        """max_completion_length new tokens at most, ending at the tokenizer's EOS."""
        return self.max_completion_length, tokenizer.eos_token_id

    @property
    def loss_agg(self) -> str:
        return LOSS_AGG[self.loss_type]
