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


def option(default, help: str):
    """A config field with its default and its --help text. Only "help" goes in the metadata: HfArgumentParser
    passes every metadata key on to argparse.add_argument."""
    return field(default=default, metadata={"help": help})


def unsupported(default, why: str):
    """A TRL field we accept only at its default, so that a TRL script setting it fails loudly, naming it (see
    PolicyGradientConfig.unsupported_trl_options); `why`: what it would need."""
    return option(default, f"not supported ({why}); must stay {default!r}")


@dataclass
class TrainerConfig(TrainingArguments):
    """Fields shared by SFTConfig, RewardConfig, PPOConfig (and the trainers built on them)."""

    # Our defaults where TrainingArguments' do not suit these trainers.
    logging_steps: float = option(10, "log every N optimisation steps")
    save_steps: float = option(500, "checkpoint every N steps (save_strategy='steps')")
    # Added fields.
    logging_dir: Optional[str] = option(None, "TensorBoard folder (default: <output_dir>/runs)")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of the steps (used when warmup_steps is 0)")
    disable_dropout: bool = option(True, "turn dropout off in every model we train or query")
    model_init_kwargs: Optional[dict] = option(
        None, "kwargs for from_pretrained when a model is given as a path (e.g. {'dtype': 'bfloat16'})"
    )
    dataset_num_proc: Optional[int] = option(None, "processes for dataset tokenisation (Dataset.map)")
    reuse_freed_cpu_memory: bool = option(
        True,
        "extra: when training on the CPU under glibc, malloc keeps freed memory for the next tensors instead of "
        "handing large blocks back to the OS, whose fresh pages the kernel zeroes on first touch at every "
        "allocation (logits, gradients); process-wide (rlhf_ext.trainers.base.reuse_freed_cpu_memory)",
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

    local_rollout_forward_batch_size: int = option(
        64, "rows per no-grad forward when scoring rollouts (old/ref log-probs, values)"
    )
    fused_linear_logprobs: bool = option(False, "extra: log-probs from hidden states via the fused op")
    logprobs_chunk_size: Optional[int] = option(None, "extra: vocabulary chunk of the fused op")
    share_prompt_forward: bool = option(
        True,
        "extra: log-prob forwards run each run of identical consecutive prompts (GRPO's groups) once, the responses "
        "attending to its KV cache (the same log-probs and gradients up to float rounding); off where it cannot "
        "apply (fused_linear_logprobs, FSDP, gradient checkpointing, active dropout)",
    )
    recompute_old_logprobs: Optional[bool] = option(
        None,
        "extra: after sampling, recompute the old log-probs with a forward pass (True) or take the sampler's, equal "
        "within float tolerance, saving that pass (False); None: recompute only under bf16, whose autocast forward "
        "differs from sampling by more than that",
    )
    max_turns: int = option(8, "extra: environment steps per episode at most (env_factory)")
    max_episode_tokens: Optional[int] = option(
        None, "extra: agent + environment tokens per episode after its first observation (env_factory)"
    )
    env_errors: str = option("log", "extra: an environment error ends its episode ('log') or training ('raise')")

    _supported_training_arguments = SUPPORTED_TRAINING_ARGUMENTS | MULTI_PROCESS_TRAINING_ARGUMENTS
    # the dataclass of the TRL fields the subclass declares with `unsupported` (refused when changed)
    unsupported_trl_options = None

    def __post_init__(self):
        for f in dataclasses.fields(self.unsupported_trl_options or ()):
            if getattr(self, f.name) != f.default:
                why = f.metadata["help"].replace("not supported", f"not supported by {type(self).__name__}", 1)
                raise ValueError(f"{f.name}: {getattr(self, f.name)!r} is {why}; remove it")
        super().__post_init__()
        # The sampling fields (each subclass declares temperature, top_k, top_p, min_p and max_prompt_length with
        # its own defaults) are checked here, stricter than SamplingSettings: the log-probs divide by the
        # temperature, and min_p = 1 would keep only the top token. TRL's GRPOConfig spells "off" None.
        self.top_k = 0 if self.top_k is None else self.top_k
        self.min_p = 0.0 if self.min_p is None else self.min_p
        require(self, "temperature", self.temperature > 0, "a value > 0")
        require(self, "top_k", self.top_k >= 0, "an integer >= 0 (0: off)")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "a value in (0, 1]")
        require(self, "min_p", 0.0 <= self.min_p < 1.0, "a value in [0, 1) (0: off)")
        require(
            self, "max_prompt_length", self.max_prompt_length is None or self.max_prompt_length >= 1, "None or >= 1"
        )
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

    @property
    def old_logprobs_from_sampler(self) -> bool:
        """Whether the old log-probs are the sampler's (see recompute_old_logprobs)."""
        return not (self.bf16 if self.recompute_old_logprobs is None else self.recompute_old_logprobs)

    def completion_limit(self, tokenizer) -> tuple:
        """(max_new_tokens, stop_token_id or None): how long a completion may grow and which token ends it."""
        raise NotImplementedError

    def sampling_settings(self, tokenizer) -> SamplingSettings:
        """How completions are sampled: the sampling fields, the tokenizer's pad token, and `completion_limit`."""
        max_new_tokens, stop_token_id = self.completion_limit(tokenizer)
        return SamplingSettings(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            stop_token_id=stop_token_id,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
        )


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def require(config, name: str, ok: bool, expected: str):
    """Raise a ValueError naming the config field when `ok` is false."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name}: expected {expected}, got {getattr(config, name)!r}")
