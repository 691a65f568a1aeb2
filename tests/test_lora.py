"""LoRA through peft_config: only adapter weights train, the reference is the base model with the adapter
disabled (no second copy), save_model writes the adapter or the merged model, checkpoints resume."""

import os

import pytest
import torch
from peft import LoraConfig

from rlhf_ext import GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.trainers.experience import reference_logprobs
from tests.trainer_helpers import grpo_args, ppo_args, rows_for, target_fraction, target_ppo

pytestmark = pytest.mark.usefixtures("single_thread")


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], **kwargs)


def base_weights(peft_model) -> dict:
    """The base model's own weights (adapter tensors excluded), by name."""
    return {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_sft_lora_trains_only_the_adapter_and_saves_or_merges_it(make_lm, tiny_tokenizer, corpus, cpu_args, tmp_path):
    from transformers import AutoModelForCausalLM

    original = make_lm()
    args = SFTConfig(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", **cpu_args)
    trainer = SFTTrainer(
        make_lm(),
        args=args,
        train_dataset=[{"text": t} for t in corpus[:16]],
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = base_weights(trainer.model)
    trainer.train()
    for name, value in base_weights(trainer.model).items():
        assert torch.equal(value, frozen[name]), name
    ids = torch.tensor([tiny_tokenizer("the movie was")["input_ids"]])
    with trainer.model.disable_adapter():
        torch.testing.assert_close(logits(trainer.model, ids), logits(original, ids))
    tuned = logits(trainer.model, ids)
    assert not torch.allclose(tuned, logits(original, ids))

    trainer.save_model(str(tmp_path / "adapter"))
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    assert not os.path.exists(tmp_path / "adapter" / "model.safetensors")
    trainer.save_model(str(tmp_path / "merged"), merge_adapter=True)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(merged, ids), tuned, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(trainer.model, ids), tuned)  # the training model keeps its adapter


def test_reward_lora_trains_adapter_and_score_head(make_rm, tiny_tokenizer, cpu_args, tmp_path):
    from peft import PeftModel

    pairs = [{"prompt": "the movie", "chosen": " was great", "rejected": " was awful"}] * 8
    args = RewardConfig(
        max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no", logging_steps=1, **cpu_args
    )
    with pytest.raises(ValueError, match="task_type='SEQ_CLS'"):
        RewardTrainer(make_rm(), args=args, train_dataset=pairs, processing_class=tiny_tokenizer, peft_config=lora())
    trainer = RewardTrainer(
        make_rm(),
        args=args,
        train_dataset=pairs,
        processing_class=tiny_tokenizer,
        peft_config=lora(task_type="SEQ_CLS"),
    )
    frozen = {k: v for k, v in base_weights(trainer.model).items() if "score" not in k}
    logs = trainer.train().log_history
    assert logs[-1]["accuracy"] == 1.0
    for name, value in base_weights(trainer.model).items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    trainer.save_model(str(tmp_path / "rm"))
    reloaded = PeftModel.from_pretrained(make_rm(), str(tmp_path / "rm"))
    ids = torch.tensor([tiny_tokenizer("the movie was great")["input_ids"]])
    torch.testing.assert_close(logits(reloaded, ids), logits(trainer.model, ids))


def test_grpo_lora_reference_is_the_base_model_and_stays_fixed(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    original = make_lm()
    args = grpo_args(cpu_args, beta=0.1, learning_rate=3e-2, max_steps=2)
    trainer = GRPOTrainer(
        make_lm(),
        [target_fraction],
        args=args,
        train_dataset=prompt_rows,
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    assert trainer.ref_model is None  # no second copy of the weights
    exp, _ = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
    batch = (exp.sequences, exp.attention_mask, exp.prompt_length)
    ref_before = reference_logprobs(trainer.policy, trainer.ref_model, *batch, args)
    torch.testing.assert_close(ref_before, sequence_logprobs(original, *batch))
    frozen = base_weights(trainer.policy)
    logs = trainer.train().log_history
    ref_after = reference_logprobs(trainer.policy, trainer.ref_model, *batch, args)
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=0)
    assert all(torch.equal(v, frozen[k]) for k, v in base_weights(trainer.policy).items())
    assert logs[-1]["kl"] > 0


@pytest.mark.parametrize("shared_critic", [False, True])
def test_ppo_lora_checkpoint_resumes(shared_critic, make_lm, tiny_tokenizer, prompt_rows, cpu_args, tmp_path):
    def run(output_dir, max_steps, resume=None):
        args = ppo_args(
            {**cpu_args, "output_dir": str(output_dir)},
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=1,
            lr_scheduler_type="constant",
            shared_critic=shared_critic,
        )
        trainer = target_ppo(
            args,
            tiny_tokenizer,
            make_lm(),
            train_dataset=prompt_rows,
            peft_config=lora(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 2)
    assert full.ref_model is None
    assert os.path.exists(tmp_path / "full" / "checkpoint-1" / "adapter_model.safetensors")
    run(tmp_path / "cut", 1)
    resumed = run(tmp_path / "cut", 2, resume=str(tmp_path / "cut" / "checkpoint-1"))
    for module in ("policy", "critic"):
        for a, b in zip(getattr(full, module).parameters(), getattr(resumed, module).parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
