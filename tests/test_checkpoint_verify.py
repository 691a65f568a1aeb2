"""Checkpoint manifests: written last, verified on resume; a damaged newest checkpoint is skipped with a warning
naming what is wrong and the newest valid one is resumed exactly; every load error names its file."""

import hashlib
import json
import logging
import os
import shutil

import pytest
import torch

from rlhf_ext.trainers import checkpoint as ckpt
from rlhf_ext.trainers.checkpoint import CheckpointError
from tests.trainer_helpers import sft_trainer as sft

pytestmark = pytest.mark.usefixtures("single_thread")


def state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(make_lm, tiny_tokenizer, corpus, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints 2 and 4: (output_dir, final weights)."""
    out = str(tmp_path_factory.mktemp("full"))
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    trainer.train()
    return out, state(trainer)


def test_manifest_lists_every_file_with_size_and_sha256(full_run):
    folder = os.path.join(full_run[0], "checkpoint-4")
    manifest = json.load(open(os.path.join(folder, ckpt.MANIFEST)))
    on_disk = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
    assert sorted(manifest["files"]) == [f for f in on_disk if f != ckpt.MANIFEST]
    assert {"optimizer.pt", "model.safetensors", "trainer_state.json", "rng_state.pt"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = open(os.path.join(folder, name), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(folder) is None


def truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def flip_last_byte(path):
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate, "model.safetensors has"),
    "truncated optimizer": ("optimizer.pt", truncate, "optimizer.pt has"),
    "missing optimizer": ("optimizer.pt", os.remove, "optimizer.pt is missing"),
    "flipped byte in scheduler": ("scheduler.pt", flip_last_byte, "scheduler.pt does not match its sha256"),
    "truncated trainer state": ("trainer_state.json", truncate, "trainer_state.json has"),
    "garbled manifest": (ckpt.MANIFEST, truncate, "manifest.json is unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(
    case, full_run, make_lm, tiny_tokenizer, corpus, tmp_path, caplog
):
    name, damage, problem = DAMAGE[case]
    out = str(tmp_path / "out")
    shutil.copytree(full_run[0], out)
    damage(os.path.join(out, "checkpoint-4", name))
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert any("checkpoint-4" in r.getMessage() and problem in r.getMessage() for r in caplog.records), caplog.text
    full = full_run[1]
    resumed = state(trainer)
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)


def test_empty_newest_checkpoint_folder_is_skipped(full_run, make_lm, tiny_tokenizer, corpus, tmp_path, caplog):
    out = str(tmp_path / "out")
    shutil.copytree(full_run[0], out)
    os.makedirs(os.path.join(out, "checkpoint-99"))
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    with caplog.at_level(logging.WARNING):
        assert trainer.resolve_checkpoint(True).endswith("checkpoint-4")
    assert "checkpoint-99" in caplog.text and "optimizer.pt is missing or empty" in caplog.text


def test_explicit_damaged_checkpoint_is_refused_naming_the_file(full_run, make_lm, tiny_tokenizer, corpus, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(full_run[0], out)
    truncate(os.path.join(out, "checkpoint-4", "optimizer.pt"))
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    with pytest.raises(CheckpointError, match=r"checkpoint-4/optimizer.pt has \d+ bytes"):
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))


def test_no_valid_checkpoint_lists_every_problem(full_run, make_lm, tiny_tokenizer, corpus, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(full_run[0], out)
    os.remove(os.path.join(out, "checkpoint-4", "optimizer.pt"))
    truncate(os.path.join(out, "checkpoint-2", "model.safetensors"))
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*checkpoint-4/optimizer.pt.*checkpoint-2/model"):
        trainer.train(resume_from_checkpoint=True)


def test_checkpoint_without_manifest_still_resumes(full_run, make_lm, tiny_tokenizer, corpus, tmp_path, caplog):
    """Checkpoints written before manifests: resumed (with a warning that they are unverified) when complete."""
    out = str(tmp_path / "out")
    shutil.copytree(full_run[0], out)
    shutil.rmtree(os.path.join(out, "checkpoint-4"))
    os.remove(os.path.join(out, "checkpoint-2", ckpt.MANIFEST))
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert "has no manifest.json" in caplog.text
    full = full_run[1]
    assert all(torch.equal(state(trainer)[k], full[k]) for k in full)


@pytest.mark.parametrize(
    "name",
    ["optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_extra.json", "trainer_state.json", "model.safetensors"],
)
def test_load_errors_name_the_file(name, full_run, make_lm, tiny_tokenizer, corpus, tmp_path):
    """A damaged file in a checkpoint without a manifest (nothing to verify against) fails naming that file."""
    out = str(tmp_path / "out")
    shutil.copytree(full_run[0], out)
    folder = os.path.join(out, "checkpoint-2")
    os.remove(os.path.join(folder, ckpt.MANIFEST))
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(b"\x00garbage")
    trainer = sft(make_lm, tiny_tokenizer, corpus, out)
    with pytest.raises(CheckpointError, match=f"checkpoint file .*checkpoint-2/{name}"):
        trainer.train(resume_from_checkpoint=folder)
