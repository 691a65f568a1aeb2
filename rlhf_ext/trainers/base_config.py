"""The config base every rlhf_ext trainer shares (reading one from YAML + `--key value` is
rlhf_ext.commands.parsing's job).

`TrainerConfig` subclasses `transformers.TrainingArguments`, so scripts written for TRL pass the same
fields (`output_dir`, `learning_rate`, `per_device_train_batch_size`, `use_cpu`, `bf16`, ...) and
`transformers.TrainerCallback`s receive a real `TrainingArguments`. TrainingArguments has ~120 fields;
our trainers implement the ones in `SUPPORTED_TRAINING_ARGUMENTS`. Setting any other one to a
non-default value is an error that names it — never silently ignored.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from rlhf_ext.generation import SamplingSettings

SUPPORTED_TRAINING_ARGUMENTS = frozenset(
    {
        # what and where
        "output_dir",
        "run_name",
        "seed",
        "data_seed",
        "full_determinism",
        "use_cpu",
        "bf16",
        "tf32",
        "do_train",
        "do_eval",
        "do_predict",
        "resume_from_checkpoint",
        "local_rank",
        "log_level",
        "log_level_replica",
        "remove_unused_columns",  # we only ever read the columns we need; the others stay available to reward fns
        "average_tokens_across_devices",  # SFT loss is averaged over all tokens of the accumulation window
        # batch and schedule
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "optim",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        # logging, evaluation, checkpoints
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "disable_tqdm",
        "report_to",
        "eval_strategy",
        "eval_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
    }
)

# What the multi-process trainers (PPO, GRPO/RLOO) add: the process group's backend and timeout, and FSDP.
MULTI_PROCESS_TRAINING_ARGUMENTS = frozenset({"ddp_backend", "ddp_timeout", "fsdp", "fsdp_config"})

DEEPSPEED_REFUSAL = (
    "{name}: the accelerate config (distributed_type: DEEPSPEED) asks for DeepSpeed, which rlhf_ext does not support: "
    "its trainers own the backward pass and the optimizer step that the DeepSpeed engine takes over. For sharded "
    "training use an accelerate FSDP config instead (fsdp_reshard_after_forward: true ~ ZeRO-3, false ~ ZeRO-2); "
    "see examples/accelerate/fsdp.yaml and the README section 'Sharded training'."
)

SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
SUPPORTED_REPORT_TO = ("tensorboard",)


def env_flag(name: str) -> bool:
    """A boolean environment variable as `accelerate launch` exports them ("true"/"false")."""
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# TrainingArguments.__post_init__ rewrites some defaults ("none" -> [], None -> False, ...). A config rebuilt
# from a post-init one (dataclasses.replace, to_dict) carries the rewritten form; both count as "not set".
# HfArgumentParser (TRL's scripts) gives debug=None and include_num_input_tokens_seen=False for "not set".
_NORMALISED_DEFAULTS = {
    "debug": [[], None],
    "report_to": [[]],
    "disable_tqdm": [False],
    "activation_checkpointing": [False],
    "gradient_checkpointing": [False],
    "include_num_input_tokens_seen": [False],
}


def _is_default(name: str, value, default) -> bool:
    if name == "accelerator_config" and value is not None and not isinstance(value, (dict, str)):
        return dataclasses.asdict(value) == dataclasses.asdict(type(value)())
    return value == default or any(value == d for d in _NORMALISED_DEFAULTS.get(name, []))


@dataclass
class TrainerConfig(TrainingArguments):
    """Fields shared by SFTConfig, RewardConfig, PPOConfig (and the trainers built on them)."""

    # Our defaults where TrainingArguments' do not suit these trainers.
    logging_steps: float = field(default=10, metadata={"help": "log every N optimisation steps"})
    save_steps: float = field(default=500, metadata={"help": "checkpoint every N steps (save_strategy='steps')"})
    # Added fields.
    logging_dir: Optional[str] = field(
        default=None, metadata={"help": "TensorBoard folder (default: <output_dir>/runs)"}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "warm-up as a fraction of the steps (used when warmup_steps is 0)"}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "turn dropout off in every model we train or query"})
    model_init_kwargs: Optional[dict] = field(
        default=None,
        metadata={"help": "kwargs for from_pretrained when a model is given as a path (e.g. {'dtype': 'bfloat16'})"},
    )
    dataset_num_proc: Optional[int] = field(
        default=None, metadata={"help": "processes for dataset tokenisation (Dataset.map)"}
    )

    # Subclasses extend this (the multi-process trainers add MULTI_PROCESS_TRAINING_ARGUMENTS).
    _supported_training_arguments = SUPPORTED_TRAINING_ARGUMENTS

    def __post_init__(self):
        self._refuse_unsupported()
        if env_flag("ACCELERATE_USE_DEEPSPEED"):
            # (TrainingArguments would otherwise go looking for the deepspeed package first)
            raise ValueError(DEEPSPEED_REFUSAL.format(name=type(self).__name__))
        self._check_common_ranges()
        if self.report_to is None:  # `--report_to none` parses as None
            self.report_to = "none"
        if self.report_to in ("all", ["all"]):  # every installed integration *that we support*
            self.report_to = [name for name in SUPPORTED_REPORT_TO if _installed(name)]
        super().__post_init__()
        # `accelerate launch` with `mixed_precision: bf16|fp16` in its config asks through ACCELERATE_MIXED_PRECISION
        # (TrainingArguments.mixed_precision); the trainers autocast from `bf16`, so honour it there.
        precision = getattr(self, "mixed_precision", "no") or "no"
        if precision == "fp16":
            raise ValueError(
                f"{type(self).__name__}: the accelerate config asks for mixed_precision=fp16, which is not "
                "supported (no loss scaling); use bf16"
            )
        if precision == "bf16":
            self.bf16 = True
        for name in self.report_to:
            if name not in SUPPORTED_REPORT_TO:
                raise ValueError(
                    f"report_to: {name!r} is not supported; expected 'none', 'all' or one of {SUPPORTED_REPORT_TO}"
                )
            if not _installed(name):
                raise ValueError(
                    f"report_to: {name!r} needs the {name} package, which is not installed (pip install {name})"
                )
        if self.optim not in SUPPORTED_OPTIMIZERS:
            raise ValueError(
                f"optim: expected one of {SUPPORTED_OPTIMIZERS}, got {getattr(self.optim, 'value', self.optim)!r}"
            )
        if self.save_strategy not in ("no", "steps", "epoch"):
            raise ValueError(f"save_strategy: expected 'no', 'steps' or 'epoch', got {self.save_strategy.value!r}")
        if self.logging_dir is None:
            self.logging_dir = f"{self.output_dir}/runs"

    def _refuse_unsupported(self):
        base_fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
        own_defaults = {f.name: _default_of(f) for f in dataclasses.fields(self)}
        for name in base_fields:
            if name in self._supported_training_arguments:
                continue
            value = getattr(self, name)
            if not _is_default(name, value, own_defaults[name]):
                raise ValueError(
                    f"{name}: the transformers.TrainingArguments option {name}={value!r} is not supported by "
                    f"{type(self).__name__} (it would be silently ignored); remove it. Supported TrainingArguments "
                    "fields: rlhf_ext.trainers.base_config.SUPPORTED_TRAINING_ARGUMENTS"
                )

    def _check_common_ranges(self):
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"]
        for name in positive:
            require(self, name, getattr(self, name) >= 1, "an integer >= 1")
        require(self, "learning_rate", self.learning_rate >= 0, "a value >= 0")
        require(self, "max_grad_norm", self.max_grad_norm is None or self.max_grad_norm >= 0, "None or a value >= 0")
        require(self, "warmup_ratio", 0.0 <= self.warmup_ratio <= 1.0, "a value in [0, 1]")
        require(self, "num_train_epochs", self.num_train_epochs > 0 or self.max_steps > 0, "> 0 (or set max_steps)")
        require(self, "save_total_limit", self.save_total_limit is None or self.save_total_limit >= 1, "None or >= 1")
        require(self, "weight_decay", self.weight_decay >= 0, "a value >= 0")

    def warmup_for(self, num_training_steps: int) -> int:
        """Warm-up steps: `warmup_steps` (a count, or a fraction when < 1), else `warmup_ratio`."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        if self.warmup_steps > 0:
            return int(round(self.warmup_steps * num_training_steps))
        return int(round(self.warmup_ratio * num_training_steps))


@dataclass
class PolicyGradientConfig(TrainerConfig):
    """Fields PPOConfig and GRPOConfig share: how the no-grad scoring passes and the log-probs are computed."""

    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "rows per no-grad forward when scoring rollouts (old/ref log-probs, values)"}
    )
    fused_linear_logprobs: bool = field(
        default=False, metadata={"help": "extra: log-probs from hidden states via the fused op"}
    )
    logprobs_chunk_size: Optional[int] = field(
        default=None, metadata={"help": "extra: vocabulary chunk of the fused op"}
    )
    max_turns: int = field(default=8, metadata={"help": "extra: environment steps per episode at most (env_factory)"})
    max_episode_tokens: Optional[int] = field(
        default=None, metadata={"help": "extra: agent + environment tokens per episode after its first observation"}
    )
    env_errors: str = field(
        default="log", metadata={"help": "extra: an environment error ends its episode ('log') or training ('raise')"}
    )

    def __post_init__(self):
        super().__post_init__()
        require(self, "local_rollout_forward_batch_size", self.local_rollout_forward_batch_size >= 1, "an integer >= 1")
        require(self, "max_turns", isinstance(self.max_turns, int) and self.max_turns >= 1, "an integer >= 1")
        require(
            self,
            "max_episode_tokens",
            self.max_episode_tokens is None
            or (isinstance(self.max_episode_tokens, int) and self.max_episode_tokens >= 1),
            "None or an integer >= 1",
        )
        require(self, "env_errors", self.env_errors in ("log", "raise"), "'log' or 'raise'")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def require(config, name: str, ok: bool, expected: str):
    """Raise a ValueError naming the config field when `ok` is false."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name}: expected {expected}, got {getattr(config, name)!r}")


def sampling_settings(config, tokenizer, max_new_tokens: int, stop_token_id: Optional[int]) -> SamplingSettings:
    """The SamplingSettings of a config with the sampling fields (PPOConfig, GRPOConfig): its temperature, top_k,
    top_p and min_p, the tokenizer's pad token, and the length limit and stop token the config chooses."""
    knobs = {name: getattr(config, name) for name in ("temperature", "top_k", "top_p", "min_p")}
    return SamplingSettings(
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, stop_token_id=stop_token_id, **knobs
    )


def check_sampling_fields(config):
    """The sampling fields PPOConfig and GRPOConfig share, checked when the config is built (stricter than
    SamplingSettings: the log-probs divide by the temperature, and min_p = 1 would keep only the top token)."""
    require(config, "temperature", config.temperature > 0, "a value > 0")
    require(config, "top_k", config.top_k >= 0, "an integer >= 0 (0: off)")
    require(config, "top_p", 0.0 < config.top_p <= 1.0, "a value in (0, 1]")
    require(config, "min_p", 0.0 <= config.min_p < 1.0, "a value in [0, 1) (0: off)")
    require(
        config, "max_prompt_length", config.max_prompt_length is None or config.max_prompt_length >= 1, "None or >= 1"
    )
