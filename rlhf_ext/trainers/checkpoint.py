"""Atomic checkpoints, RNG state capture, the HF-format model folders they (and save_model) write, and what a
trainer's checkpoint holds (`write_trainer_checkpoint` / `read_trainer_checkpoint`).

A checkpoint is written in full to a hidden temporary folder next to its final place, then renamed
with os.replace (atomic on POSIX). A crash at any moment leaves either the previous complete
checkpoints or the new one, never a half-written `checkpoint-N`. Temporary folders left by a crash are
ignored by `latest_checkpoint` and removed by the next save.

Each checkpoint ends with `manifest.json` (written last, itself atomically): every other file's size and
sha256. `verify_checkpoint` checks it, so a checkpoint damaged after it was published (a truncated file, a
deleted optimizer.pt, an empty folder) is detected before anything is loaded from it. Checkpoints written
before manifests existed are accepted when they hold the files every checkpoint has (not verified further).
"""

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from rlhf_ext.trainers.lora import is_peft_model, merged_from_full_state, save_model_folder
from rlhf_ext.trainers.sharding import full_optimizer_state, load_full_optimizer_state

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Files every checkpoint has besides the weights (what a manifest-less, older checkpoint is checked for).
REQUIRED_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_extra.json", "trainer_state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


@contextlib.contextmanager
def reading(path: str):
    """Any error while loading from `path` becomes a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"checkpoint file {path}: {type(err).__name__}: {err}") from err


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str):
    """{"format", "files": {relative path: {"size", "sha256"}}} of every file in `folder`, written last and
    atomically (temporary name, fsync, rename), so a manifest exists only over complete files."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            relative = os.path.relpath(full, folder).replace(os.sep, "/")
            files[relative] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def verify_checkpoint(folder: str) -> Optional[str]:
    """None when `folder` is a complete checkpoint, else what is wrong, naming the file."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):  # an older checkpoint, or one damaged after it was published
        for name in REQUIRED_FILES:
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                return f"{path} is missing or empty (and {folder} has no {MANIFEST})"
        if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
            return f"{folder} holds no .safetensors weights (and no {MANIFEST})"
        return None
    try:
        with open(manifest_path) as fh:
            files = json.load(fh)["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{manifest_path} is unreadable ({type(err).__name__}: {err})"
    for name, size, sha256 in entries:
        path = os.path.join(folder, *name.split("/"))
        if not os.path.isfile(path):
            return f"{path} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} has {actual} bytes, {size} when it was saved (truncated or overwritten)"
        if _sha256(path) != sha256:
            return f"{path} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


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


def resolve_checkpoint(output_dir: str, resume_from_checkpoint) -> Optional[str]:
    """The checkpoint to resume from: True/"latest" is the newest one in `output_dir` that verifies (older ones
    are tried in turn, with a warning naming what was wrong); a folder given by path must verify itself."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=True: no checkpoint-N folder in {output_dir}")
        problems = []
        for _, path in reversed(found):
            problem = verify_checkpoint(path)
            if problem is None:
                _warn_unverified(path)
                return path
            problems.append(problem)
            logger.warning("resume_from_checkpoint: skipping %s: %s", path, problem)
        raise CheckpointError(
            f"resume_from_checkpoint=True: no usable checkpoint in {output_dir}: " + "; ".join(problems)
        )
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint!r} is not a folder")
    problem = verify_checkpoint(resume_from_checkpoint)
    if problem is not None:
        raise CheckpointError(f"resume_from_checkpoint: {problem}")
    _warn_unverified(resume_from_checkpoint)
    return resume_from_checkpoint


def _warn_unverified(path: str):
    if not has_manifest(path):
        logger.warning(
            "resume_from_checkpoint: %s has no %s (written by an older rlhf_ext); its files are loaded "
            "without checksum verification",
            path,
            MANIFEST,
        )


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


def save_atomic(
    output_dir: str, step: int, write: Callable[[str], None], save_total_limit: Optional[int] = None
) -> str:
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
        write_manifest(tmp)  # last: its presence says every file above was written in full
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
        with reading(os.path.join(folder, name)):
            state.update(load_file(os.path.join(folder, name)))
    return state


def load_weights(model: torch.nn.Module, folder: str):
    """Load the weights that `save_pretrained` wrote in `folder` into `model` in place (keeps the object,
    its optimizer references and tied weights). Only keys tied to a loaded parameter may be missing.
    A peft model loads its adapter weights (adapter_model.safetensors)."""
    from rlhf_ext.trainers.lora import load_adapter_weights

    with reading(os.path.join(folder, "adapter_model.safetensors")):
        if load_adapter_weights(model, folder):
            return
    state = read_weights(folder)
    with reading(folder):
        missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint: {folder} has weights the model does not: {unexpected[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise KeyError(f"checkpoint: {folder} lacks weights for {untied[:5]}")


def write_models(models: dict, states: dict, output_dir: str, processing_class, merge_adapter: bool = False):
    """Each {subfolder: module} in HF format under output_dir ("" is the main model; `save_pretrained`, a bare head
    as model.safetensors) and the tokenizer. states: {subfolder: full state dict} of FSDP-sharded modules, written
    in place of theirs. A LoRA model writes its adapter, or with `merge_adapter` the base weights with it merged."""
    for sub, module in models.items():
        folder = os.path.join(output_dir, sub)
        os.makedirs(folder, exist_ok=True)
        if sub in states and merge_adapter and is_peft_model(module):
            merged_from_full_state(module, states[sub]).save_pretrained(folder)
        elif sub in states:
            module.save_pretrained(folder, state_dict=states[sub])
        elif hasattr(module, "save_pretrained"):
            save_model_folder(module, folder, merge_adapter)
        else:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in module.state_dict().items()}, os.path.join(folder, "model.safetensors")
            )
    if processing_class is not None:
        processing_class.save_pretrained(output_dir)


def write_trainer_checkpoint(trainer) -> str:
    """Publish `checkpoint-<global_step>` in the trainer's output_dir: weights, optimizer, scheduler, RNGs,
    trainer_extra.json (the algorithm's state), trainer_state.json and the trainer's payload files. Call from
    every process: sharded weights and optimizer states are gathered by every rank, then written by rank 0."""
    args, optimizer = trainer.args, trainer.optimizer
    step = trainer.reporter.state.global_step
    trainer.check_finite_weights()
    payload = trainer.checkpoint_payload()
    model_states = trainer.gather_models()
    optimizer_state = full_optimizer_state(optimizer) if trainer._sharded else None

    def write(folder):
        write_models(trainer.models_to_save(), model_states, folder, trainer.processing_class)
        torch.save(optimizer_state or optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
        torch.save(trainer.lr_scheduler.state_dict(), os.path.join(folder, "scheduler.pt"))
        torch.save(capture_rng(trainer.rng_generators()), os.path.join(folder, "rng_state.pt"))
        with open(os.path.join(folder, "trainer_extra.json"), "w") as fh:
            json.dump(trainer.trainer_extra_state(), fh)
        trainer.reporter.state.save_to_json(os.path.join(folder, "trainer_state.json"))
        for name, obj in payload.items():
            torch.save(obj, os.path.join(folder, name))

    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    if trainer.dist.is_main:
        path = save_atomic(args.output_dir, step, write, args.save_total_limit)
    trainer.dist.barrier()  # no process reads a checkpoint before it is published
    return path


def read_trainer_checkpoint(trainer, path: str) -> int:
    """Restore the trainer's weights, optimizer, scheduler, RNGs and state (log history) from `path`, the
    inverse of `write_trainer_checkpoint`; returns its step. Every error names the file it came from."""
    from transformers import TrainerState

    for sub, module in trainer.models_to_save().items():
        folder = os.path.join(path, sub)
        sharded = trainer.sharded(module)
        if sharded:
            state = read_weights(folder)
            with reading(folder):
                sharded.load_full_state_dict(state, source=f"checkpoint {folder}")
        else:
            load_weights(module, folder)
    file = os.path.join(path, "optimizer.pt")
    with reading(file):
        optimizer_state = torch.load(file, map_location=trainer.device, weights_only=True)
        if trainer._sharded:
            load_full_optimizer_state(trainer.optimizer, optimizer_state)
        else:
            trainer.optimizer.load_state_dict(optimizer_state)
    file = os.path.join(path, "scheduler.pt")
    with reading(file):
        trainer.lr_scheduler.load_state_dict(torch.load(file, weights_only=True))
    file = os.path.join(path, "rng_state.pt")
    with reading(file):  # our own file (NumPy RNG state is an ndarray inside a tuple: weights_only refuses it)
        restore_rng(torch.load(file, weights_only=False), trainer.rng_generators())
    file = os.path.join(path, "trainer_extra.json")
    with reading(file):
        with open(file) as fh:
            trainer.load_trainer_extra_state(json.load(fh))
    with reading(path):  # the algorithm's own files (they name themselves where they can)
        trainer.load_checkpoint_payload(path)
    file = os.path.join(path, "trainer_state.json")
    with reading(file):
        saved = TrainerState.load_from_json(file)
    trainer.reporter.state.log_history = saved.log_history
    return saved.global_step
