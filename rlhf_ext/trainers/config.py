"""The config base every rlhf_ext trainer shares, and config parsing from YAML + `--key value`.

`TrainerConfig` subclasses `transformers.TrainingArguments`, so scripts written for TRL pass the same
fields (`output_dir`, `learning_rate`, `per_device_train_batch_size`, `use_cpu`, `bf16`, ...) and
`transformers.TrainerCallback`s receive a real `TrainingArguments`. TrainingArguments has ~120 fields;
our trainers implement the ones in `SUPPORTED_TRAINING_ARGUMENTS`. Setting any other one to a
non-default value is an error that names it — never silently ignored.
"""

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from transformers import TrainingArguments

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

    # Subclasses extend this (issue 8 adds the distributed fields).
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
                    "fields: rlhf_ext.trainers.config.SUPPORTED_TRAINING_ARGUMENTS"
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


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def require(config, name: str, ok: bool, expected: str):
    """Raise a ValueError naming the config field when `ok` is false."""
    if not ok:
        raise ValueError(f"{type(config).__name__}.{name}: expected {expected}, got {getattr(config, name)!r}")


# ---- parsing from YAML and the command line ----

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


def _parse_scalar(text: str):
    """A command-line or YAML string as the value it spells: bool, None, int, float, list/dict, else str."""
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null", "~"):
        return None
    if _INT.match(text.strip()):
        return int(text)
    if _FLOAT.match(text.strip()):
        return float(text)
    if text.strip()[:1] in ("[", "{"):
        import yaml

        return yaml.safe_load(text)
    return text


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def coerce(value, tp, name: str):
    """Convert `value` (from YAML or the command line) to the field type `tp`; raise naming `name`."""
    if tp is Any or tp is typing.Any:
        return value
    if _is_union(tp):
        members = typing.get_args(tp)
        parsed = _parse_scalar(value) if isinstance(value, str) else value
        if parsed is None and type(None) in members:
            return None
        for member in members:  # an exact type match first, then conversions
            if (
                member is not type(None)
                and typing.get_origin(member) is None
                and isinstance(member, type)
                and isinstance(parsed, member)
                and not (member is int and isinstance(parsed, bool))
            ):
                return parsed
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member, name)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{name}: cannot read {value!r} as {tp}")
    origin = typing.get_origin(tp)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    parsed = _parse_scalar(value) if isinstance(value, str) else value
    if tp is bool:
        if isinstance(parsed, bool):
            return parsed
        if parsed in (0, 1):
            return bool(parsed)
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or int(parsed) != parsed:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(parsed)
    if tp is float:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(parsed)
    if tp is list or origin is list:
        if isinstance(parsed, str):
            parsed = [p.strip() for p in parsed.split(",") if p.strip()]
        if not isinstance(parsed, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_type, name) for v in parsed]
    if tp is dict or origin is dict:
        if not isinstance(parsed, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return parsed
    return parsed


def parse_overrides(argv: list) -> dict:
    """`["--key", "value", "--flag", "--k2=v"]` -> {"key": "value", "flag": "true", "k2": "v"} (strings)."""
    out, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"unexpected argument {token!r}: options are --key value pairs (e.g. --config FILE.yaml)")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag
            i += 1
        out[key.replace("-", "_")] = value
    return out


def config_from_dict(cls, values: dict, source: str = "config"):
    """Build `cls` (a config dataclass) from raw values, converting each to its field's type. An unknown
    key is an error that suggests the nearest field name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown {cls.__name__} field {key!r}{hint}")
        kwargs[key] = coerce(value, hints[key], key)
    return cls(**kwargs)


def load_yaml(path: str) -> dict:
    """The flat mapping in the YAML file `path`; every error names the file (and the line, for bad YAML)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text (byte offset {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"--config {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value, got a YAML {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"--config {path}: key {bad[0]!r} is not a field name")
    return data
