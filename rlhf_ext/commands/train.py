"""`rlhf-ext train sft|reward|ppo|grpo|rloo --config file.yaml [--key value ...]`.

`rlhf-ext train ppo|grpo|rloo --env package.module:Factory ...` trains on a gym-style environment (one
`Factory()` per episode; rlhf_ext.environments.protocol); the dataset is then optional (its rows reach `reset`).

The YAML file is a flat mapping: the algorithm's config fields (SFTConfig / RewardConfig / PPOConfig,
including the supported TrainingArguments fields) plus the script keys below. `--key value` pairs on
the command line override the file. Models, tokenizers and datasets are local paths only.
"""

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import textwrap

# algorithm -> (its trainer module, which also exports the config, config class, trainer class)
ALGORITHMS = {
    "sft": ("rlhf_ext.trainers.sft", "SFTConfig", "SFTTrainer"),
    "reward": ("rlhf_ext.trainers.reward", "RewardConfig", "RewardTrainer"),
    "ppo": ("rlhf_ext.trainers.ppo", "PPOConfig", "PPOTrainer"),
    "grpo": ("rlhf_ext.trainers.grpo", "GRPOConfig", "GRPOTrainer"),
    "rloo": ("rlhf_ext.trainers.rloo", "RLOOConfig", "RLOOTrainer"),
}
ON_POLICY = ("ppo", "grpo", "rloo")

# Keys that say what to train on, rather than how (TRL's ScriptArguments/ModelConfig names).
SCRIPT_KEYS = {
    "model_name_or_path": "local folder of the model to train (a causal LM; for `reward`, any HF checkpoint)",
    "sft_model_path": "ppo: TRL's name for model_name_or_path",
    "tokenizer_name_or_path": "tokenizer folder (default: the model's folder)",
    "dataset_name": "training data: a .jsonl/.json/.parquet/.csv file, a save_to_disk folder or a folder of files",
    "dataset_train_split": "split to train on (default 'train')",
    "eval_dataset_name": "evaluation data, same formats (default: dataset_name's dataset_test_split, if set)",
    "dataset_test_split": "split of dataset_name to evaluate on",
    "reward_model_path": "ppo/grpo/rloo: local reward model folder (sequence classifier, num_labels=1)",
    "ref_model_path": "ppo: reference model folder (default: a frozen copy of the policy)",
    "value_model_path": "ppo: critic folder (default: a copy of the reward model, else the policy's backbone)",
    "reward_funcs": "ppo/grpo/rloo: reward functions as 'package.module:function' or 'path/to/file.py:function' "
    "(grpo/rloo also take reward model folders) (a list)",
    "env": "ppo/grpo/rloo: environment factory 'package.module:Factory' (gym-style reset/step, one per episode); "
    "dataset_name and rewards become optional",
    "use_peft": "train a LoRA adapter instead of the full model (TRL's ModelConfig names below)",
    "lora_r": "LoRA rank (default 16)",
    "lora_alpha": "LoRA alpha (default 32)",
    "lora_dropout": "LoRA dropout (default 0.05)",
    "lora_target_modules": "modules that get an adapter (default: peft's choice for the architecture)",
}


def register(subparsers):
    p = subparsers.add_parser(
        "train",
        help="train with SFT, a reward model, PPO, GRPO or RLOO from a YAML config",
        description="Train a model. `rlhf-ext train ALGORITHM --help` lists every field of that algorithm's config.",
        usage="rlhf-ext train {sft,reward,ppo,grpo,rloo} [--config FILE.yaml] [--key value ...]",
    )
    p.add_argument("algorithm", choices=sorted(ALGORITHMS), help="what to train")
    p.add_argument("options", nargs=argparse.REMAINDER, help="--config FILE.yaml and --key value overrides")
    p.set_defaults(func=run)


def _classes(algorithm):
    module_name, config_name, trainer_name = ALGORITHMS[algorithm]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, trainer_name)


def algorithm_help(algorithm: str) -> str:
    from rlhf_ext.trainers.base_config import SUPPORTED_TRAINING_ARGUMENTS

    config_cls, _ = _classes(algorithm)
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    lines = [f"usage: rlhf-ext train {algorithm} [--config FILE.yaml] [--key value ...]", "", "script keys:"]
    lines += [f"  --{k:<28} {v}" for k, v in SCRIPT_KEYS.items()]
    # (PPOConfig also has sft_model_path / reward_model_path, TRL's names, which the script keys above cover)
    for title, keep in (
        (f"{config_cls.__name__} fields:", lambda n: n not in base and n not in SCRIPT_KEYS),
        ("supported transformers.TrainingArguments fields:", lambda n: n in SUPPORTED_TRAINING_ARGUMENTS),
    ):
        lines += ["", title]
        for f in dataclasses.fields(config_cls):
            if f.init and not f.name.startswith("_") and keep(f.name):
                text = " ".join(str(f.metadata.get("help", "")).split())
                default = f.default if f.default is not dataclasses.MISSING else "..."
                lines.append(f"  --{f.name:<28} {textwrap.shorten(text, 90)} (default: {default!r})")
    return "\n".join(lines)


def load_reward_function(spec: str):
    """'package.module:function' or 'path/to/file.py:function'."""
    if ":" not in spec:
        raise ValueError(f"reward_funcs: {spec!r} should look like 'package.module:function' or 'file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise FileNotFoundError(f"reward_funcs: {target!r} does not exist")
        module_name = f"_rlhf_ext_reward_{abs(hash(os.path.abspath(target)))}"
        spec_obj = importlib.util.spec_from_file_location(module_name, target)
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise AttributeError(f"reward_funcs: {target!r} has no function {name!r}")
    return getattr(module, name)


def build(algorithm: str, values: dict):
    """(trainer, config) from a flat mapping of script keys and config fields."""
    from rlhf_ext.commands.parsing import config_from_dict
    from rlhf_ext.trainers.data import load_local_dataset

    config_cls, trainer_cls = _classes(algorithm)
    script = {k: values.pop(k) for k in list(values) if k in SCRIPT_KEYS}
    config = config_from_dict(config_cls, values)
    if config.disable_tqdm:  # quiet means quiet: also the data loading, tokenising and weight loading bars
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    model = script.get("model_name_or_path") or script.get("sft_model_path")
    if not model:
        raise ValueError("model_name_or_path: required (a local model folder)")
    check_model_folder(model, "model_name_or_path" if script.get("model_name_or_path") else "sft_model_path")
    env_factory = env_factory_of(script, algorithm)
    if not script.get("dataset_name") and env_factory is None:
        raise ValueError("dataset_name: required (a local data file or folder)")
    train = (
        load_local_dataset(script["dataset_name"], script.get("dataset_train_split", "train"))
        if script.get("dataset_name")
        else None
    )
    if script.get("eval_dataset_name"):
        evaluation = load_local_dataset(script["eval_dataset_name"], script.get("dataset_test_split", "train"))
    elif script.get("dataset_test_split"):
        evaluation = load_local_dataset(script["dataset_name"], script["dataset_test_split"])
    else:
        evaluation = None
    tokenizer = load_script_tokenizer(script.get("tokenizer_name_or_path"), model)
    peft_config = lora_config(script, algorithm)
    common = dict(
        args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer, peft_config=peft_config
    )
    if algorithm in ("sft", "reward"):
        unused = [k for k in ("reward_model_path", "ref_model_path", "value_model_path", "reward_funcs") if k in script]
        if unused:
            users = ON_POLICY if unused[0] in ("reward_model_path", "reward_funcs") else ("ppo",)
            raise ValueError(f"{unused[0]}: only used by " + ", ".join(f"`rlhf-ext train {a}`" for a in users))
        return trainer_cls(model, **common), config
    funcs = script.get("reward_funcs") or []
    funcs = [funcs] if isinstance(funcs, str) else list(funcs)
    if algorithm in ("grpo", "rloo"):
        unused = [k for k in ("ref_model_path", "value_model_path") if k in script]
        if unused:
            raise ValueError(
                f"{unused[0]}: only used by `rlhf-ext train ppo` ({algorithm} has no critic, and its "
                "reference is the starting policy)"
            )
        sources = [f if os.path.isdir(f) else load_reward_function(f) for f in funcs]
        if script.get("reward_model_path"):
            sources.insert(0, script["reward_model_path"])
        return trainer_cls(model, sources, **common, env_factory=env_factory), config
    trainer = trainer_cls(
        model=model,
        ref_model=script.get("ref_model_path"),
        reward_model=script.get("reward_model_path"),
        reward_funcs=[load_reward_function(s) for s in funcs] or None,
        value_model=script.get("value_model_path"),
        env_factory=env_factory,
        **common,
    )
    return trainer, config


def env_factory_of(script: dict, algorithm: str):
    """The environment factory the `env` key names ('package.module:Factory'), or None without one."""
    spec = script.get("env")
    if spec is None:
        return None
    if algorithm not in ON_POLICY:
        raise ValueError("env: only used by " + ", ".join(f"`rlhf-ext train {a}`" for a in ON_POLICY))
    from rlhf_ext.environments.protocol import load_env_factory

    return load_env_factory(spec)


def check_model_folder(path, key: str):
    """`path` is a local folder holding a model (config.json), else an error naming `key`."""
    from rlhf_ext.trainers.loading import checkpoint_architectures

    if not isinstance(path, str) or not os.path.isdir(path):
        raise FileNotFoundError(
            f"{key}: {path!r} does not exist or is not a folder (expected a local model folder; "
            "hub names are not downloaded)"
        )
    try:
        checkpoint_architectures(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}: {err}") from None


def load_script_tokenizer(tokenizer_path, model_path):
    """The tokenizer of `tokenizer_name_or_path`, else the one saved with the model; errors name the key."""
    from rlhf_ext.trainers.loading import load_tokenizer

    key, path = ("tokenizer_name_or_path", tokenizer_path) if tokenizer_path else ("model_name_or_path", model_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}: {path!r} does not exist or is not a folder")
    return load_tokenizer(None, path, key)


def lora_config(script: dict, algorithm: str):
    """A peft.LoraConfig from TRL's ModelConfig keys when use_peft is set, else None."""
    from typing import Optional

    from rlhf_ext.commands.parsing import coerce

    lora_keys = [k for k in script if k.startswith("lora_")]
    if not coerce(script.get("use_peft", False), bool, "use_peft"):
        if lora_keys:
            raise ValueError(f"{lora_keys[0]}: only used with use_peft=true")
        return None
    from peft import LoraConfig

    targets = coerce(script.get("lora_target_modules"), Optional[list[str]], "lora_target_modules")
    return LoraConfig(
        r=coerce(script.get("lora_r", 16), int, "lora_r"),
        lora_alpha=coerce(script.get("lora_alpha", 32), int, "lora_alpha"),
        lora_dropout=coerce(script.get("lora_dropout", 0.05), float, "lora_dropout"),
        target_modules=targets,
        task_type="SEQ_CLS" if algorithm == "reward" else "CAUSAL_LM",
    )


def parse_options(options: list):
    """(config_path, overrides dict, wants_help) from the tokens after the algorithm."""
    from rlhf_ext.commands.parsing import parse_overrides

    if any(tok in ("-h", "--help") for tok in options):
        return None, {}, True
    overrides = parse_overrides(options)
    return overrides.pop("config", None), overrides, False


def _one_line(err) -> str:
    return " ".join(str(err).split())


def run(args) -> int:
    from rlhf_ext.trainers.base import NonFiniteError
    from rlhf_ext.trainers.checkpoint import CheckpointError

    prefix = f"rlhf-ext train {args.algorithm}"
    try:
        config_path, overrides, wants_help = parse_options(args.options)
        if wants_help:
            print(algorithm_help(args.algorithm))
            return 0
        from rlhf_ext.commands.parsing import load_yaml

        values = load_yaml(config_path) if config_path else {}
        values.update(overrides)
        trainer, config = build(args.algorithm, values)
    except (ValueError, TypeError, OSError, AttributeError) as err:
        print(f"{prefix}: {_one_line(err)}", file=sys.stderr)
        return 2
    try:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    except (CheckpointError, FileNotFoundError) as err:  # resume_from_checkpoint named nothing usable
        print(f"{prefix}: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # training diverged or the data holds NaN/inf: nothing was saved after it
        print(f"{prefix}: {_one_line(err)}", file=sys.stderr)
        return 1
    trainer.save_model(config.output_dir)
    if trainer.dist.is_main:
        print(f"saved the trained model to {config.output_dir}")
    import torch.distributed as td

    if td.is_initialized():  # under torchrun / accelerate launch: leave together (gloo can abort at exit otherwise)
        td.barrier()
        td.destroy_process_group()
    return 0
