"""Non-finite values never train silently: data is refused at load, and every trainer stops on a non-finite
gradient norm or loss with an error naming the step and the quantity, before the optimizer step (so the
weights stay those of the last good step) and before any checkpoint with non-finite weights is written."""

import os

import pytest
import torch
from transformers import TrainerCallback

from rlhf_ext import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from rlhf_ext.trainers.base import NonFiniteError
from rlhf_ext.trainers.data import load_local_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


class PoisonGradientsAfter(TrainerCallback):
    """From the step after `step` on, every gradient of `param` is multiplied by NaN (a diverging step)."""

    def __init__(self, param: torch.nn.Parameter, step: int):
        self.armed = False
        self.step = step
        param.register_hook(lambda grad: grad * float("nan") if self.armed else grad)

    def on_step_end(self, args, state, control, **kwargs):
        self.armed = state.global_step >= self.step


def checkpoints(output_dir):
    return sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))


def assert_stops_at_step_3(trainer, model, output_dir):
    """Training with gradients poisoned from step 3 on raises naming step 3; checkpoint-2 is the last one, and
    the weights in memory are finite and equal to it."""
    with pytest.raises(NonFiniteError, match=r"step 3: the gradient norm is nan .*checkpoint-2"):
        trainer.train()
    assert checkpoints(output_dir) == ["checkpoint-1", "checkpoint-2"]
    from safetensors.torch import load_file

    saved = load_file(os.path.join(output_dir, "checkpoint-2", "model.safetensors"))
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert all(torch.equal(saved[name], params[name].detach()) for name in saved if name in params)


def test_sft_stops_on_non_finite_gradient_norm(make_lm, tiny_tokenizer, corpus, cpu_args):
    args = SFTConfig(max_steps=5, per_device_train_batch_size=4, save_steps=1, learning_rate=1e-3, **cpu_args)
    model = make_lm()
    poison = PoisonGradientsAfter(model.get_input_embeddings().weight, 2)
    trainer = SFTTrainer(
        model,
        args,
        train_dataset=[{"text": t} for t in corpus[:16]],
        processing_class=tiny_tokenizer,
        callbacks=[poison],
    )
    assert_stops_at_step_3(trainer, model, args.output_dir)


def test_reward_stops_on_non_finite_gradient_norm(make_rm, tiny_tokenizer, cpu_args):
    args = RewardConfig(max_steps=5, per_device_train_batch_size=2, save_steps=1, **cpu_args)
    model = make_rm()
    poison = PoisonGradientsAfter(model.score.weight, 2)
    pairs = [{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    trainer = RewardTrainer(model, args, train_dataset=pairs, processing_class=tiny_tokenizer, callbacks=[poison])
    assert_stops_at_step_3(trainer, model, args.output_dir)


def test_ppo_stops_on_non_finite_gradient_norm(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    args = PPOConfig(
        max_steps=5,
        per_device_train_batch_size=4,
        num_mini_batches=1,
        num_ppo_epochs=1,
        response_length=4,
        save_steps=1,
        num_sample_generations=0,
        **cpu_args,
    )
    model = make_lm()
    poison = PoisonGradientsAfter(model.get_input_embeddings().weight, 2)
    trainer = PPOTrainer(
        args=args,
        processing_class=tiny_tokenizer,
        model=model,
        reward_funcs=[lambda prompts, completions, **kw: [1.0] * len(completions)],
        train_dataset=prompt_rows[:16],
        callbacks=[poison],
    )
    assert_stops_at_step_3(trainer, model, args.output_dir)


def test_grpo_stops_on_non_finite_gradient_norm(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    args = GRPOConfig(
        max_steps=5, per_device_train_batch_size=4, num_generations=2, max_completion_length=4, save_steps=1, **cpu_args
    )
    model = make_lm()
    poison = PoisonGradientsAfter(model.get_input_embeddings().weight, 2)
    trainer = GRPOTrainer(
        model,
        [lambda prompts, completions, **kw: [float(len(c)) for c in completions]],
        args=args,
        train_dataset=prompt_rows[:16],
        processing_class=tiny_tokenizer,
        callbacks=[poison],
    )
    assert_stops_at_step_3(trainer, model, args.output_dir)


def test_non_finite_loss_metric_stops_before_the_save(make_lm, tiny_tokenizer, corpus, cpu_args):
    args = SFTConfig(max_steps=2, per_device_train_batch_size=4, save_steps=1, **cpu_args)
    rows = [{"text": t} for t in corpus[:8]]
    trainer = SFTTrainer(make_lm(), args, train_dataset=rows, processing_class=tiny_tokenizer)
    trainer.train()
    trainer.reporter.state.global_step = 6
    for metrics, quantity in (({"loss": float("inf")}, "loss"), ({"loss/value_avg": float("nan")}, "loss/value_avg")):
        with pytest.raises(NonFiniteError, match=f"step 7: the {quantity} is"):
            trainer.end_step({**metrics, "grad_norm": 1.0})
    assert checkpoints(args.output_dir) == ["checkpoint-1", "checkpoint-2"]


def test_checkpoint_with_non_finite_weights_is_never_written(make_lm, tiny_tokenizer, corpus, cpu_args):
    args = SFTConfig(max_steps=1, per_device_train_batch_size=4, save_strategy="no", **cpu_args)
    model = make_lm()
    trainer = SFTTrainer(model, args, train_dataset=[{"text": t} for t in corpus[:8]], processing_class=tiny_tokenizer)
    trainer.train()
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="weight model.embed_tokens.weight"):
        trainer.save_state()
    assert not any(d.startswith("checkpoint-") for d in os.listdir(args.output_dir))


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_margin_is_refused_at_load(tmp_path, bad):
    path = tmp_path / "prefs.jsonl"
    with open(path, "w") as fh:
        for i in range(4):
            margin = bad if i == 2 else "0.5"
            fh.write(f'{{"chosen": "a", "rejected": "b", "margin": {margin}}}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl, line 3: column 'margin' is (nan|inf|-inf)"):
        load_local_dataset(str(path))


def test_non_finite_margin_in_memory_is_refused(make_rm, tiny_tokenizer, cpu_args):
    pairs = [{"chosen": "a", "rejected": "b", "margin": m} for m in (0.5, float("nan"))]
    with pytest.raises(ValueError, match=r"train_dataset: row 1: column 'margin' is nan \(numbers must be finite\)"):
        RewardTrainer(make_rm(), RewardConfig(**cpu_args), train_dataset=pairs, processing_class=tiny_tokenizer)


def test_cli_reward_with_nan_margin_exits_2_without_saving(tmp_path, make_rm, tiny_tokenizer):
    from rlhf_ext.cli import main

    make_rm().save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    with open(tmp_path / "prefs.jsonl", "w") as fh:
        for i in range(4):
            margin = "NaN" if i else "1.0"
            fh.write(f'{{"chosen": "a", "rejected": "b", "margin": {margin}}}\n')
    code = main(
        [
            "train",
            "reward",
            "--model_name_or_path",
            str(tmp_path / "rm"),
            "--dataset_name",
            str(tmp_path / "prefs.jsonl"),
            "--output_dir",
            str(tmp_path / "out"),
            "--use_cpu",
            "--max_steps",
            "1",
        ]
    )
    assert code == 2
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_tokenize_pair_refuses_a_non_finite_margin(tiny_tokenizer):
    from rlhf_ext.trainers.reward import tokenize_pair

    with pytest.raises(ValueError, match=r"train_dataset: row 3: column 'margin' must be a finite number, got inf"):
        tokenize_pair({"chosen": "a", "rejected": "b", "margin": float("inf")}, tiny_tokenizer, 3)


def test_cli_divergence_is_one_line_and_exit_1(tmp_path, make_lm, tiny_tokenizer, corpus, capsys):
    """A learning rate of 1e30 makes step 1's weights huge and step 2's gradients non-finite: the command stops
    with one line naming step 2 and the last good checkpoint, and saves no final model."""
    from rlhf_ext.cli import main

    make_lm().save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    with open(tmp_path / "text.jsonl", "w") as fh:
        fh.writelines(f'{{"text": "{line}"}}\n' for line in corpus[:8])
    out = tmp_path / "out"
    capsys.readouterr()  # the set-up's own progress bars
    code = main(
        [
            "train",
            "sft",
            "--model_name_or_path",
            str(tmp_path / "policy"),
            "--dataset_name",
            str(tmp_path / "text.jsonl"),
            "--output_dir",
            str(out),
            "--use_cpu",
            "--disable_tqdm",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e30",
            "--save_steps",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "step 2: the gradient norm is" in err and "checkpoint-1" in err
    assert checkpoints(out) == ["checkpoint-1"] and not os.path.exists(out / "model.safetensors")


@pytest.mark.parametrize("ext", ["json", "parquet", "csv"])
def test_non_finite_values_in_other_formats_name_the_row(tmp_path, ext):
    import datasets

    rows = [{"chosen": "a", "rejected": "b", "margin": m} for m in (0.5, 1.0, float("inf"))]
    path = tmp_path / f"prefs.{ext}"
    if ext == "json":
        path.write_text(
            '[{"chosen": "a", "rejected": "b", "margin": 0.5}, {"chosen": "a", "rejected": "b", '
            '"margin": 1.0}, {"chosen": "a", "rejected": "b", "margin": Infinity}]'
        )
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{ext}")(str(path))
    with pytest.raises(ValueError, match=rf"prefs.{ext}, row 2: column 'margin' is inf"):
        load_local_dataset(str(path))
