"""Atomic checkpoints and RNG state capture.

A checkpoint is written in full to a hidden temporary folder next to its final place, then renamed
with os.replace (atomic on POSIX). A crash at any moment leaves either the previous complete
checkpoints or the new one, never a half-written `checkpoint-N`. Temporary folders left by a crash are
ignored by `latest_checkpoint` and removed by the next save.
"""
import os
import random
import re
import shutil
import tempfile
from typing import Callable, Optional

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints in `output_dir`, oldest first: [(step, path)]."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def _fsync_tree(path: str):
    # Data must reach the disk before the rename that publishes it.
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())


def _publish(src: str, dst: str):
    """The single rename that makes a checkpoint visible (tests simulate a crash by failing here)."""
    os.replace(src, dst)


def save_atomic(output_dir: str, step: int, write: Callable[[str], None], save_total_limit: Optional[int] = None) -> str:
    """Call `write(tmp_dir)` to fill a fresh folder, then publish it as `<output_dir>/checkpoint-<step>`.
    Older checkpoints beyond `save_total_limit` are deleted only after the new one is in place."""
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # leftovers of an interrupted save
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step}-", dir=output_dir)
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):  # re-saving a step: move the old copy aside first (rename onto a full dir fails)
        stale = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}stale-", dir=output_dir)
        os.replace(final, os.path.join(stale, "old"))
        _publish(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        _publish(tmp, final)
    if save_total_limit is not None:
        for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def capture_rng(generators: Optional[dict] = None) -> dict:
    """Python, NumPy, torch (CPU and CUDA) global RNG states plus named torch.Generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(state: dict, generators: Optional[dict] = None):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint: no RNG state for generator {name!r}")
        g.set_state(state["generators"][name])


def read_weights(folder: str) -> dict:
    """Every tensor of the .safetensors files `save_pretrained` wrote in `folder`."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint: no .safetensors weights in {folder}")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def load_weights(model: torch.nn.Module, folder: str):
    """Load the weights that `save_pretrained` wrote in `folder` into `model` in place (keeps the object,
    its optimizer references and tied weights). Only keys tied to a loaded parameter may be missing.
    A peft model loads its adapter weights (adapter_model.safetensors)."""
    from rlhf_ext.trainers.lora import load_adapter_weights

    if load_adapter_weights(model, folder):
        return
    state = read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint: {folder} has weights the model does not: {unexpected[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise KeyError(f"checkpoint: {folder} lacks weights for {untied[:5]}")
