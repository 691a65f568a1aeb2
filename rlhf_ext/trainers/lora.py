"""LoRA (and other peft adapters) for the trainers: wrap a model with `peft_config`, use the base model
with the adapter switched off as the frozen reference (no second copy of the weights), save the adapter
alone or merged into the base weights.
"""

import copy
import os

import torch


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a kernel-only install may lack it
        return False
    return isinstance(model, PeftModel)


def apply_peft(model: torch.nn.Module, peft_config, name: str = "model") -> torch.nn.Module:
    """`model` wrapped by `peft.get_peft_model(model, peft_config)`: only the adapter weights (and any
    `modules_to_save`) require grad. `peft_config=None` returns the model unchanged."""
    if peft_config is None:
        return model
    from peft import PeftConfig, get_peft_model

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config: expected a peft.PeftConfig (e.g. peft.LoraConfig(...)), got {type(peft_config).__name__}"
        )
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"peft_config: {type(peft_config).__name__} is a prompt-learning adapter (virtual tokens); the trainers "
            "support weight adapters such as LoraConfig"
        )
    if is_peft_model(model):
        raise ValueError(
            f"{name}: already carries a peft adapter; pass the base model with peft_config, or the "
            "PeftModel without peft_config"
        )
    return get_peft_model(model, peft_config)


def save_model_folder(module: torch.nn.Module, folder: str, merge_adapter: bool = False):
    """`save_pretrained` into `folder`. A PeftModel saves its adapter (adapter_config.json +
    adapter_model.safetensors); with `merge_adapter=True`, a copy is merged into the base weights and
    saved as a plain HF model instead (the training model keeps its adapter)."""
    os.makedirs(folder, exist_ok=True)
    if merge_adapter and is_peft_model(module):
        merged = copy.deepcopy(module).merge_and_unload()
        merged.save_pretrained(folder)
        return
    module.save_pretrained(folder)


def merged_from_full_state(model, state: dict) -> torch.nn.Module:
    """A plain HF model with the adapter merged in, rebuilt from `state`, the full state dict of the PeftModel
    `model` (used when `model` itself is FSDP-sharded, so it cannot be copied and merged directly)."""
    from peft import get_peft_model

    base = model.get_base_model()
    fresh = type(base)(copy.deepcopy(base.config))
    fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config[model.active_adapter]))
    fresh.load_state_dict(state, strict=True)
    return fresh.merge_and_unload()


def load_adapter_weights(model, folder: str) -> bool:
    """Load adapter weights saved by `save_pretrained` of a PeftModel into `model` in place. Returns False
    when `model` is not a peft model (the caller loads plain weights)."""
    if not is_peft_model(model):
        return False
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint: {folder} has no adapter_model.safetensors (was it saved from a peft model?)"
        )
    result = set_peft_model_state_dict(model, load_file(path))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise KeyError(f"checkpoint: {path} has adapter weights the model does not: {unexpected[:5]}")
    return True
