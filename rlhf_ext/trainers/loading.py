"""Loading the models and tokenizers a trainer is given as local paths, refusing the wrong kind of checkpoint
by name: a causal LM where a trained score head is needed, a sequence classifier where a policy is; and PPO's
critic, built from what it is given (`load_critic`)."""

import copy
import json
import os
from typing import Optional

from torch import nn

from rlhf_ext.models.heads import ValueHead, critic_from_causal_lm
from rlhf_ext.models.introspect import dropout_sites
from rlhf_ext.trainers.base_config import TrainerConfig
from rlhf_ext.trainers.data import require_pad_token
from rlhf_ext.trainers.lora import is_peft_model

# Checkpoints whose head a loader would initialise at random, by the Auto class asked for.
_HEAD_SUFFIXES = {"causal_lm": "ForCausalLM", "sequence_classification": "ForSequenceClassification"}
# Sequence-classifier roles that may start from a causal LM with a fresh score head (it is trained): the
# RewardTrainer's model and PPO's critic. A reward model used for scoring must have a trained head.
_FRESH_HEAD_OK = ("model", "value_model")


def checkpoint_architectures(folder: str) -> list:
    """The `architectures` of `folder`/config.json; raises naming the folder when it holds no model."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} is not a model folder (it has no config.json)")
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: not a readable model config ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a model config (expected a JSON object)")
    return [a for a in config.get("architectures") or [] if isinstance(a, str)]


def check_model_kind(architectures: list, kind: str, name: str, what: str, fresh_head_ok: bool):
    """Refuse a checkpoint of the other kind: a causal LM as a scoring reward model (its score head would
    be random) or a sequence classifier as a policy (its LM head would be random)."""
    if not architectures or any(a.endswith(_HEAD_SUFFIXES[kind]) for a in architectures):
        return
    expected = {
        "causal_lm": "a causal LM (e.g. LlamaForCausalLM)",
        "sequence_classification": "a sequence classifier with num_labels=1 (e.g. LlamaForSequenceClassification)",
    }
    if kind == "sequence_classification" and any(a.endswith("ForCausalLM") for a in architectures):
        if fresh_head_ok:
            return
        raise ValueError(
            f"{name}: {what} is a causal LM ({architectures[0]}), so its score head would be random; "
            f"expected {expected[kind]}, e.g. one trained with `rlhf-ext train reward`"
        )
    if kind == "causal_lm" and any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"{name}: {what} is a sequence classifier ({architectures[0]}), so its LM head would be "
            f"random; expected {expected[kind]}"
        )


def load_model(
    model, kind: str, args: TrainerConfig, name: str = "model", fresh_head_ok: Optional[bool] = None, **extra_kwargs
):
    """`model` as a loaded `PreTrainedModel` (returned as is) or a local path loaded with the Auto class
    for `kind` ("causal_lm" or "sequence_classification"). A checkpoint of the other kind is refused, except
    that `fresh_head_ok` (default: for `name` "model" and "value_model") lets a causal LM start a sequence
    classifier whose score head will be trained."""
    fresh_head_ok = name in _FRESH_HEAD_OK if fresh_head_ok is None else fresh_head_ok
    if isinstance(model, nn.Module):
        architectures = [type(model).__name__] if type(model).__name__.endswith(tuple(_HEAD_SUFFIXES.values())) else []
        check_model_kind(architectures, kind, name, f"the {type(model).__name__} given", fresh_head_ok)
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a model or a local path, got {type(model).__name__}")
    if not os.path.isdir(model):
        raise FileNotFoundError(
            f"{name}: {str(model)!r} does not exist or is not a folder "
            "(expected a local model folder; hub names are not downloaded)"
        )
    try:
        architectures = checkpoint_architectures(model)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None
    check_model_kind(architectures, kind, name, repr(str(model)), fresh_head_ok)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}[kind]
    kwargs = {**(args.model_init_kwargs or {}), **extra_kwargs}
    return auto.from_pretrained(model, **kwargs)


def load_critic(args, policy: nn.Module, value_model, reward_model: Optional[nn.Module], device, prepare) -> nn.Module:
    """PPO's critic: with shared_critic a zero-initialised ValueHead on `policy`'s hidden states (moved to `device`);
    else the value_model given (object or local path), a copy of the reward model (as InstructGPT initialises it),
    or the policy's backbone with a fresh score head, made trainable and passed through `prepare`. With LoRA only
    the policy gets the adapter (call this before it does): the critic is trained in full."""
    if args.shared_critic:
        if value_model is not None:
            raise ValueError("value_model: must be None with shared_critic=True (the value head lives on the policy)")
        return ValueHead(policy.config.get_text_config().hidden_size).to(device)
    if value_model is not None:
        critic = load_model(value_model, "sequence_classification", args, "value_model", num_labels=1)
    elif reward_model is not None:
        critic = copy.deepcopy(reward_model)
    else:
        critic = critic_from_causal_lm(copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) else policy)
    return prepare(critic.requires_grad_(True))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(processing_class, model_path=None, name: str = "processing_class"):
    """The tokenizer given, else the one stored with a model given as a path."""
    if processing_class is not None:
        return processing_class
    if isinstance(model_path, (str, os.PathLike)) and os.path.isdir(model_path):
        if not any(os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
            raise ValueError(
                f"{name}: {str(model_path)!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); "
                "pass one, or save it there with tokenizer.save_pretrained(...)"
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    if isinstance(model_path, (str, os.PathLike)):
        raise FileNotFoundError(
            f"{name}: none given, and the model path {str(model_path)!r} does not exist or is not "
            "a folder (expected a local model folder)"
        )
    raise ValueError(f"{name}: required when the model is not given as a local path that holds a tokenizer")


def load_padding_tokenizer(processing_class, model):
    """A trainer's tokenizer (`load_tokenizer`), refused without a pad token: every trainer pads its batches."""
    tokenizer = load_tokenizer(processing_class, model)
    require_pad_token(tokenizer)
    return tokenizer


def disable_dropout(model: nn.Module):
    """Dropout off everywhere: nn.Dropout modules and the float `attention_dropout` attributes that SDPA
    attention reads directly (PPO's ratios assume the same network computes the old and new log-probs)."""
    for module, name in dropout_sites(model):
        setattr(module, name, 0.0)
