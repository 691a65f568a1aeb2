import ctypes
import json
import os
import platform

import pytest
import torch

from rlhf_ext import SFTConfig, SFTTrainer
from rlhf_ext.models.heads import causal_lm_token_logprobs
from rlhf_ext.trainers.data import pad
from rlhf_ext.trainers.sft import tokenize_sft_row
from tests.trainer_helpers import assert_declared_metrics, sft_trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sft_text_loss_decreases_and_writes_outputs(make_lm, tiny_tokenizer, corpus, cpu_args):
    args = SFTConfig(
        max_steps=12,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=4,
        save_steps=6,
        eval_strategy="steps",
        eval_steps=12,
        **cpu_args,
    )
    trainer = SFTTrainer(
        make_lm(),
        args,
        train_dataset=[{"text": t} for t in corpus[:128]],
        eval_dataset=[{"text": t} for t in corpus[128:144]],
        processing_class=tiny_tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    state = trainer.train()
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert trainer.evaluate()["eval_loss"] < before - 0.3
    out = args.output_dir
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-12", "checkpoint-6"]
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in lines if "loss" in r] == [4, 8, 12]
    assert {"loss", "grad_norm", "learning_rate", "num_tokens", "epoch"} <= set(lines[0])
    assert any("eval_loss" in r for r in lines)
    assert_declared_metrics(trainer, state.log_history)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_sft_other_architectures_run(arch, make_lm, tiny_tokenizer, corpus, cpu_args):
    args = SFTConfig(max_steps=2, per_device_train_batch_size=4, save_strategy="no", **cpu_args)
    model = make_lm(arch)
    start = [p.detach().clone() for p in model.parameters()]
    SFTTrainer(model, args, train_dataset=[{"text": t} for t in corpus[:8]], processing_class=tiny_tokenizer).train()
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))


def test_completion_only_mask(tiny_tokenizer):
    args = SFTConfig(output_dir="unused", use_cpu=True)
    row = tokenize_sft_row({"prompt": "the movie", "completion": " was great"}, tiny_tokenizer, args)
    prompt_len = len(tiny_tokenizer("the movie")["input_ids"])
    assert row["completion_mask"][:prompt_len] == [0] * prompt_len
    assert all(row["completion_mask"][prompt_len:])
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id
    args.completion_only_loss = False
    assert all(
        tokenize_sft_row({"prompt": "the movie", "completion": " was great"}, tiny_tokenizer, args)["completion_mask"]
    )


def test_assistant_only_loss_masks_user_turns(tiny_tokenizer):
    args = SFTConfig(output_dir="unused", use_cpu=True, assistant_only_loss=True)
    messages = [
        {"role": "user", "content": "rate the film"},
        {"role": "assistant", "content": "it was good"},
        {"role": "user", "content": "and the food"},
        {"role": "assistant", "content": "awful"},
    ]
    row = tokenize_sft_row({"messages": messages}, tiny_tokenizer, args)
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    assert tiny_tokenizer.decode(trained) == "it was good</s>awful</s>"


def test_fused_and_logits_paths_agree(make_lm, tiny_tokenizer):
    model = make_lm()
    ids, mask = pad(
        [tiny_tokenizer("the movie was great")["input_ids"], tiny_tokenizer("bad")["input_ids"]],
        tiny_tokenizer.pad_token_id,
        "right",
    )
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    fused = causal_lm_token_logprobs(model, ids, mask, labels, fused_linear=True)
    plain = causal_lm_token_logprobs(model, ids, mask, labels, fused_linear=False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert (fused[1, 1:] == 0).all()  # padding after the short row's last token contributes nothing


def test_save_model_round_trips(make_lm, tiny_tokenizer, corpus, cpu_args, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = SFTConfig(max_steps=1, per_device_train_batch_size=4, save_strategy="no", **cpu_args)
    trainer = SFTTrainer(
        make_lm(), args, train_dataset=[{"text": t} for t in corpus[:8]], processing_class=tiny_tokenizer
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert AutoTokenizer.from_pretrained(str(tmp_path / "final")).get_vocab() == tiny_tokenizer.get_vocab()


def test_sft_bad_inputs(make_lm, tiny_tokenizer, cpu_args):
    from rlhf_ext.models.tiny import build_tokenizer

    args = SFTConfig(max_steps=1, **cpu_args)
    with pytest.raises(ValueError, match="expected a 'text' column"):
        SFTTrainer(make_lm(), args, train_dataset=[{"foo": "x"}], processing_class=tiny_tokenizer)
    no_pad = build_tokenizer(pad_token=None, kind="wordlevel")
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        SFTTrainer(make_lm(), args, train_dataset=[{"text": "x"}], processing_class=no_pad)
    with pytest.raises(ValueError, match="packing"):
        SFTConfig(packing=True, **cpu_args)
    with pytest.raises(ValueError, match="push_to_hub"):
        SFTConfig(push_to_hub=True, **cpu_args)
    with pytest.raises(ValueError, match="max_length"):
        SFTConfig(max_length=1, **cpu_args)
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        SFTTrainer(
            make_lm(),
            SFTConfig(eval_strategy="steps", eval_steps=1, **cpu_args),
            train_dataset=[{"text": "x"}],
            processing_class=tiny_tokenizer,
        )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tuning (other C libraries: a no-op)")
def test_reuse_freed_cpu_memory_serves_big_tensors_from_the_heap():
    """After reuse_freed_cpu_memory, a 64 MB tensor is no longer its own mmap (glibc's mallinfo2: the bytes in
    mmapped blocks do not grow) and, freed, stays in the heap for the next one."""
    from rlhf_ext.trainers.base import reuse_freed_cpu_memory

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    assert reuse_freed_cpu_memory() and reuse_freed_cpu_memory()  # applies, and again is a no-op
    before = libc.mallinfo2().hblkhd
    big = torch.ones(16 * 1024 * 1024)  # 64 MB
    assert libc.mallinfo2().hblkhd < before + big.numel() * 4
    del big
    assert libc.mallinfo2().fordblks >= 16 * 1024 * 1024 * 4  # kept free in the heap, not unmapped


@pytest.mark.parametrize("on", [True, False])
def test_trainers_tune_malloc_on_the_cpu_unless_told_not_to(on, make_lm, tiny_tokenizer, corpus, tmp_path, monkeypatch):
    from rlhf_ext.trainers import base

    calls = []
    monkeypatch.setattr(base, "reuse_freed_cpu_memory", lambda: calls.append(True))
    sft_trainer(make_lm, tiny_tokenizer, corpus, str(tmp_path), reuse_freed_cpu_memory=on)
    assert calls == ([True] if on else [])
