import json
import os

import pytest
import torch
from transformers import TrainerCallback

from rlhf_ext.trainers import checkpoint as ckpt
from tests.trainer_helpers import ppo_args, sft_trainer, target_ppo

pytestmark = pytest.mark.usefixtures("single_thread")


class StopAt(TrainerCallback):
    """Simulates an interruption: stops training once global_step reaches `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, dict(logs)))

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step, kwargs["model"] is not None))

    def on_save(self, args, state, control, checkpoint=None, **kwargs):
        self.events.append(("save", state.global_step, checkpoint))


def ppo(make_lm, tokenizer, rows, output_dir, callbacks=None, **overrides):
    settings = dict(
        max_steps=4,
        response_length=5,
        learning_rate=3e-3,
        save_strategy="steps",
        save_steps=2,
        target_kl=0.05,
        kl_horizon=50,
    )
    quiet_cpu = dict(output_dir=output_dir, use_cpu=True, disable_tqdm=True, seed=0)
    args = ppo_args(quiet_cpu, **{**settings, **overrides})
    return target_ppo(args, tokenizer, make_lm(), train_dataset=rows, callbacks=callbacks)


def weights(trainer):
    return {name: p.detach().clone() for m in (trainer.policy, trainer.critic) for name, p in m.named_parameters()}


def metrics(output_dir):
    return [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(make_lm, tiny_tokenizer, prompt_rows, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    recorder = Recorder()
    trainer = ppo(make_lm, tiny_tokenizer, prompt_rows, out, callbacks=[recorder])
    trainer.train()
    return weights(trainer), metrics(out), trainer.kl_coef, recorder


def drop_timing(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_second"} for r in records]


def test_ppo_resume_is_exact(uninterrupted, make_lm, tiny_tokenizer, prompt_rows, tmp_path):
    full_weights, full_metrics, full_kl_coef, _ = uninterrupted
    out = str(tmp_path)
    ppo(make_lm, tiny_tokenizer, prompt_rows, out, callbacks=[StopAt(3)]).train()  # killed after step 3
    assert [step for step, _ in ckpt.list_checkpoints(out)] == [2]
    resumed = ppo(make_lm, tiny_tokenizer, prompt_rows, out)
    resumed.train(resume_from_checkpoint=True)
    assert_same(weights(resumed), full_weights)
    assert resumed.kl_coef == full_kl_coef
    # metrics.jsonl: step 3 of the interrupted run was dropped and rewritten, so it reads as one run
    assert drop_timing(metrics(out)) == drop_timing(full_metrics)


def test_crash_between_write_and_rename_keeps_last_checkpoint(
    uninterrupted, make_lm, tiny_tokenizer, prompt_rows, tmp_path, monkeypatch
):
    full_weights = uninterrupted[0]
    out = str(tmp_path)
    real_publish = ckpt._publish

    def crash_on_second(src, dst):
        if dst.endswith("checkpoint-4"):
            raise KeyboardInterrupt("killed between the write and the rename")
        real_publish(src, dst)

    monkeypatch.setattr(ckpt, "_publish", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ppo(make_lm, tiny_tokenizer, prompt_rows, out).train()
    monkeypatch.setattr(ckpt, "_publish", real_publish)
    assert ckpt.latest_checkpoint(out).endswith("checkpoint-2")
    assert any(name.startswith(ckpt.TMP_PREFIX) for name in os.listdir(out))  # the unpublished copy
    resumed = ppo(make_lm, tiny_tokenizer, prompt_rows, out)
    resumed.train(resume_from_checkpoint=True)
    assert_same(weights(resumed), full_weights)
    assert not any(name.startswith(ckpt.TMP_PREFIX) for name in os.listdir(out))  # cleaned by the next save


def test_callbacks_see_logs_steps_and_saves(uninterrupted):
    recorder = uninterrupted[3]
    assert [e[1] for e in recorder.events if e[0] == "step_end"] == [1, 2, 3, 4]
    assert all(e[2] for e in recorder.events if e[0] == "step_end")
    assert [e[1] for e in recorder.events if e[0] == "log"] == [1, 2, 3, 4]
    assert "objective/scores" in recorder.events[1][2]
    saves = [e for e in recorder.events if e[0] == "save"]
    assert [e[1] for e in saves] == [2, 4] and saves[0][2].endswith("checkpoint-2")


def test_sft_resume_is_exact(make_lm, tiny_tokenizer, corpus, tmp_path):
    def run(out, callbacks=None, resume=None):
        # seed 42: TrainingArguments' default, which this test has always run with
        trainer = sft_trainer(
            make_lm, tiny_tokenizer, corpus, out, callbacks, gradient_accumulation_steps=2, warmup_ratio=0.5, seed=42
        )
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    full = run(str(tmp_path / "a"))
    run(str(tmp_path / "b"), callbacks=[StopAt(2)])
    assert_same(run(str(tmp_path / "b"), resume=str(tmp_path / "b" / "checkpoint-2")), full)


def test_save_atomic_failure_and_rotation(tmp_path):
    out = str(tmp_path)

    def write(tag):
        def fill(folder):
            with open(os.path.join(folder, "data.txt"), "w") as fh:
                fh.write(tag)

        return fill

    def broken(folder):
        open(os.path.join(folder, "half.txt"), "w").close()
        raise OSError("disk full")

    ckpt.save_atomic(out, 1, write("one"))
    with pytest.raises(OSError):
        ckpt.save_atomic(out, 2, broken)
    assert os.listdir(out) == ["checkpoint-1"]  # the failed write left nothing behind
    ckpt.save_atomic(out, 1, write("again"))  # re-saving a step replaces it
    assert open(os.path.join(out, "checkpoint-1", "data.txt")).read() == "again"
    for step in (2, 3, 4):
        ckpt.save_atomic(out, step, write(str(step)), save_total_limit=2)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 4]


def test_resume_errors(make_lm, tiny_tokenizer, prompt_rows, tmp_path):
    trainer = ppo(make_lm, tiny_tokenizer, prompt_rows, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        trainer.train(resume_from_checkpoint=True)


def test_tensorboard_logging(make_lm, tiny_tokenizer, prompt_rows, tmp_path):
    pytest.importorskip("tensorboard")
    trainer = ppo(
        make_lm, tiny_tokenizer, prompt_rows, str(tmp_path), max_steps=1, save_strategy="no", report_to="tensorboard"
    )
    trainer.train()
    files = os.listdir(tmp_path / "runs")
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert trainer.save_state().endswith("checkpoint-1")
    assert os.path.exists(tmp_path / "trainer_state.json")
