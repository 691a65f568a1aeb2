"""A TRL 1.12 PPO script runs with only its import changed: TRL's batch arithmetic, its config fields, its
positional argument order and the trainer attributes its users call."""

import json
import math
import runpy
import sys
import textwrap

import pytest

from rlhf_ext import PPOConfig
from tests.trainer_helpers import ppo_args, target_ppo

pytestmark = pytest.mark.usefixtures("single_thread")

# TRL's examples/scripts/ppo/ppo.py (1.12), with `from trl.experimental.ppo import ...` changed to rlhf_ext and,
# because no hub is reachable here, its ScriptArguments/ModelConfig replaced by a small dataclass and
# load_dataset(name) by a local JSON file. Config fields, argument order and trainer calls are TRL's.
TRL_STYLE_SCRIPT = textwrap.dedent("""
    import json
    import shutil
    from dataclasses import dataclass

    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              HfArgumentParser, TrainerCallback)

    from rlhf_ext import PPOConfig, PPOTrainer


    @dataclass
    class ScriptArguments:
        dataset_name: str
        model_name_or_path: str


    class CountSteps(TrainerCallback):
        def __init__(self):
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1


    if __name__ == "__main__":
        parser = HfArgumentParser((ScriptArguments, PPOConfig))
        script_args, training_args = parser.parse_args_into_dataclasses()
        shutil.rmtree(training_args.output_dir, ignore_errors=True)

        tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path, padding_side="left")
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        value_model = AutoModelForSequenceClassification.from_pretrained(training_args.reward_model_path, num_labels=1)
        reward_model = AutoModelForSequenceClassification.from_pretrained(training_args.reward_model_path, num_labels=1)
        policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)
        ref_policy = AutoModelForCausalLM.from_pretrained(training_args.sft_model_path)

        dataset = load_dataset("json", data_files=script_args.dataset_name, split="train")
        eval_samples = 4
        train_dataset = dataset.select(range(len(dataset) - eval_samples))
        eval_dataset = dataset.select(range(len(dataset) - eval_samples, len(dataset)))

        def prepare_dataset(dataset, tokenizer):
            def tokenize(element):
                return {"input_ids": tokenizer(element["prompt"], padding=False)["input_ids"]}

            return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names,
                               num_proc=training_args.dataset_num_proc)

        train_dataset = prepare_dataset(train_dataset, tokenizer)
        eval_dataset = prepare_dataset(eval_dataset, tokenizer)

        counter = CountSteps()
        # TRL's positional order: args, processing_class, model, ref_model, reward_model, train_dataset,
        # value_model, data_collator, eval_dataset, optimizers, callbacks, peft_config
        trainer = PPOTrainer(training_args, tokenizer, policy, ref_policy, reward_model, train_dataset, value_model,
                             None, eval_dataset, (None, None), None, None)
        trainer.add_callback(counter)
        assert trainer.policy_model is policy and trainer.value_model is value_model
        assert trainer.model.policy is policy and trainer.model.value_model is value_model
        assert trainer.state.global_step == 0
        trainer.train()
        trainer.log({"script/custom": 1.5})
        trainer.save_model(training_args.output_dir)
        completions = trainer.generate_completions()

        if trainer.is_world_process_zero():
            with open(training_args.output_dir + "/script_result.json", "w") as fh:
                json.dump({
                    "global_step": trainer.state.global_step, "callback_steps": counter.steps,
                    "last_log": trainer.state.log_history[-1], "completions": len(completions),
                    "world_size": training_args.world_size, "local_batch_size": training_args.local_batch_size,
                    "batch_size": training_args.batch_size, "micro_batch_size": training_args.micro_batch_size,
                    "mini_batch_size": training_args.mini_batch_size,
                    "local_mini_batch_size": training_args.local_mini_batch_size,
                    "num_total_batches": training_args.num_total_batches,
                    "total_episodes": training_args.total_episodes,
                }, fh)
""")


@pytest.fixture(scope="module")
def trl_workspace(tmp_path_factory, tiny_tokenizer, corpus):
    """Local policy and reward model folders with spare embedding rows (as pythia has), so the script's new
    [PAD] token has an embedding, and a prompt file."""
    from rlhf_ext.models.tiny import tiny_causal_lm, tiny_sequence_classifier

    root = tmp_path_factory.mktemp("trl_script")
    ids = dict(
        vocab_size=len(tiny_tokenizer) + 8,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
    )
    tiny_causal_lm("llama", **ids).save_pretrained(root / "sft")
    tiny_sequence_classifier("llama", seed=1, **ids).save_pretrained(root / "rm")
    for folder in ("sft", "rm"):
        tiny_tokenizer.save_pretrained(root / folder)
    with open(root / "prompts.jsonl", "w") as fh:
        for line in corpus[:16]:
            fh.write(json.dumps({"prompt": " ".join(line.split()[:2])}) + "\n")
    (root / "ppo.py").write_text(TRL_STYLE_SCRIPT)
    return root


def test_trl_example_script_runs_unchanged(trl_workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # TRL's example command line (names and values as its docstring passes them), sized down: a step samples
    # 2 x 2 = 4 prompts split into 2 minibatches; 8 episodes = 2 steps
    argv = [
        "ppo.py",
        "--dataset_name",
        str(trl_workspace / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--num_ppo_epochs",
        "1",
        "--num_mini_batches",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--total_episodes",
        "8",
        "--model_name_or_path",
        str(trl_workspace / "sft"),
        "--sft_model_path",
        str(trl_workspace / "sft"),
        "--reward_model_path",
        str(trl_workspace / "rm"),
        "--local_rollout_forward_batch_size",
        "1",
        "--missing_eos_penalty",
        "1.0",
        "--response_length",
        "4",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(trl_workspace / "ppo.py"), run_name="__main__")
    result = json.loads((out / "script_result.json").read_text())
    assert result["global_step"] == 2 and result["callback_steps"] == 2
    assert result["last_log"]["script/custom"] == 1.5 and result["completions"] == 4
    assert {
        k: result[k]
        for k in (
            "world_size",
            "local_batch_size",
            "batch_size",
            "micro_batch_size",
            "mini_batch_size",
            "local_mini_batch_size",
            "num_total_batches",
        )
    } == {
        "world_size": 1,
        "local_batch_size": 4,
        "batch_size": 4,
        "micro_batch_size": 2,
        "mini_batch_size": 2,
        "local_mini_batch_size": 2,
        "num_total_batches": 2,
    }
    assert (out / "model.safetensors").exists() and (out / "critic" / "config.json").exists()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 4  # both steps, all eval prompts


@pytest.mark.parametrize(
    "per_device, accumulation, mini_batches, world_size, episodes",
    [(1, 16, 1, 1, 10000), (64, 1, 1, 1, 10000), (4, 4, 2, 1, 100), (2, 6, 3, 2, 50), (8, 2, 4, 4, 7)],
)
def test_batch_arithmetic_is_trls(per_device, accumulation, mini_batches, world_size, episodes, cpu_args, monkeypatch):
    monkeypatch.setattr(PPOConfig, "world_size", property(lambda self: world_size))
    args = PPOConfig(
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_mini_batches=mini_batches,
        total_episodes=episodes,
        **cpu_args,
    )
    # TRL 1.12, PPOTrainer.__init__: "calculate various batch sizes"
    local_batch_size = per_device * accumulation
    batch_size = local_batch_size * world_size
    assert args.local_batch_size == local_batch_size
    assert args.batch_size == batch_size
    assert args.micro_batch_size == per_device * world_size
    assert args.mini_batch_size == batch_size // mini_batches
    assert args.local_mini_batch_size == local_batch_size // mini_batches
    assert args.num_total_batches == math.ceil(episodes / batch_size)


def test_a_step_samples_trls_batch_and_steps_once_per_minibatch(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    # 2 x 3 = 6 prompts per step in 2 minibatches of 3, each as micro-batches of 2 and 1 rows
    args = ppo_args(
        cpu_args,
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        num_mini_batches=2,
        num_ppo_epochs=2,
        response_length=3,
    )
    trainer = target_ppo(args, tiny_tokenizer, make_lm(), train_dataset=prompt_rows)
    sampled, micro_rows, optimizer_steps = [], [], []
    make_experience, policy_forward = trainer.make_experience, trainer.policy_forward
    clip_and_step = trainer.clip_and_step
    trainer.make_experience = lambda rows, *a: sampled.append(len(rows["input_ids"])) or make_experience(rows, *a)
    trainer.policy_forward = lambda ids, attn, P, return_entropy=False: (
        (micro_rows.append(ids.shape[0]) if return_entropy else None) or policy_forward(ids, attn, P, return_entropy)
    )
    trainer.clip_and_step = lambda params: optimizer_steps.append(1) or clip_and_step(params)
    trainer.train()
    assert sampled == [6]
    assert micro_rows == [2, 1, 2, 1] * 2  # num_ppo_epochs x num_mini_batches x micro-batches
    assert len(optimizer_steps) == 2 * 2  # num_ppo_epochs x num_mini_batches
    assert trainer.state.log_history[-1]["episode"] == 6


def test_without_max_steps_trains_num_total_batches(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    # 10 prompts, 4 per step: TRL trains ceil(10 / 4) = 3 steps for one epoch (its DataLoader repeats)
    args = ppo_args(
        cpu_args,
        max_steps=-1,
        num_train_epochs=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_ppo_epochs=1,
        response_length=2,
    )
    trainer = target_ppo(args, tiny_tokenizer, make_lm(), train_dataset=prompt_rows[:10])
    assert args.total_episodes == 10 and args.num_total_batches == 3
    assert trainer.train().global_step == 3


@pytest.mark.parametrize(
    "field, value",
    [("model_adapter_name", "train"), ("ref_adapter_name", "reference"), ("ds3_gather_for_generation", False)],
)
def test_unsupported_trl_fields_are_refused_by_name(field, value, cpu_args):
    from transformers import HfArgumentParser

    from rlhf_ext.commands.parsing import config_from_dict

    with pytest.raises(ValueError, match=f"^{field}: .*not supported by PPOConfig"):
        PPOConfig(**{field: value}, **cpu_args)
    with pytest.raises(ValueError, match=f"^{field}: "):  # the CLI's path (YAML / --key value)
        config_from_dict(PPOConfig, {field: str(value), **cpu_args})
    with pytest.raises(ValueError, match=f"^{field}: "):  # a TRL script's path
        HfArgumentParser(PPOConfig).parse_args_into_dataclasses(
            [f"--{field}", str(value), "--output_dir", cpu_args["output_dir"]]
        )


def test_trl_fields_accepted_and_bad_layouts_named(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    from transformers import DataCollatorWithPadding

    args = PPOConfig(sft_model_path="sft", reward_model_path="rm", ds3_gather_for_generation=True, **cpu_args)
    assert (args.sft_model_path, args.reward_model_path) == ("sft", "rm")
    assert PPOConfig(**cpu_args).sft_model_path == "EleutherAI/pythia-160m"  # TRL's default, for scripts to read
    with pytest.raises(ValueError, match="PPOConfig.num_mini_batches: expected a divisor of local_batch_size .* = 4"):
        PPOConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=3, **cpu_args)
    args = ppo_args(cpu_args, max_steps=1)
    trainer = target_ppo(
        args,
        tiny_tokenizer,
        make_lm(),
        train_dataset=prompt_rows,
        data_collator=DataCollatorWithPadding(tiny_tokenizer),
    )  # TRL's default collator: accepted
    assert trainer.is_world_process_zero() and trainer.is_local_process_zero()
    with pytest.raises(ValueError, match="^data_collator: only None or a default"):
        target_ppo(
            args,
            tiny_tokenizer,
            make_lm(),
            train_dataset=prompt_rows,
            data_collator=DataCollatorWithPadding(tiny_tokenizer, pad_to_multiple_of=8),
        )


def test_trainer_state_log_and_model_before_training(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    import torch

    trainer = target_ppo(
        ppo_args(cpu_args, max_steps=1),
        tiny_tokenizer,
        make_lm(),
        train_dataset=prompt_rows,
    )
    assert trainer.state.global_step == 0 and trainer.state.is_world_process_zero
    trainer.log({"note": 2.0})  # before train(): kept in the run's history
    state = trainer.train()
    assert state is trainer.state and state.log_history[0] == {"note": 2.0, "step": 0}
    ids = torch.tensor([[5, 6, 7, 8]])
    output, values = trainer.model(ids, torch.ones_like(ids))
    assert output.logits.shape == (1, 4, len(tiny_tokenizer)) and values.shape == (1, 4)
    assert {n for n, _ in trainer.model.named_children()} == {"policy", "value_model"}
