import random

import pytest
import torch
import torch.nn.functional as F

from rlhf_ext import RewardConfig, RewardTrainer
from rlhf_ext.models.heads import sequence_scores
from rlhf_ext.trainers.data import pad
from tests.trainer_helpers import assert_declared_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

GOOD = ["great", "amazing", "lovely", "good"]
BAD = ["awful", "terrible", "boring", "bad"]


def pairs(n, seed=0, chat=False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(["the movie", "the food", "this book"])
        chosen, rejected = f" was {rng.choice(GOOD)}", f" was {rng.choice(BAD)}"
        if chat:
            prompt = [{"role": "user", "content": f"how was {subject}?"}]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": subject, "chosen": chosen, "rejected": rejected, "margin": 0.5})
    return rows


def test_reward_model_learns_preferences(make_rm, tiny_tokenizer, cpu_args):
    args = RewardConfig(
        max_steps=16,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=8,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=16,
        center_rewards_coefficient=0.01,
        **cpu_args,
    )
    trainer = RewardTrainer(
        make_rm("gpt2"), args, train_dataset=pairs(128), eval_dataset=pairs(32, seed=1), processing_class=tiny_tokenizer
    )
    state = trainer.train()
    train_logs = [h for h in state.log_history if "loss" in h]
    assert {"accuracy", "margin", "mean_reward", "grad_norm", "learning_rate"} <= set(train_logs[0])
    evals = [h for h in state.log_history if "eval_accuracy" in h]
    assert evals and evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_margin"] > 0.5
    assert_declared_metrics(trainer, state.log_history)


def test_evaluate_on_a_dataset_given_to_it(make_rm, tiny_tokenizer, cpu_args):
    args = RewardConfig(max_steps=1, per_device_eval_batch_size=3, **cpu_args)
    trainer = RewardTrainer(make_rm(), args, train_dataset=pairs(4), processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.evaluate()
    rows = pairs(5, seed=2)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    out = trainer.evaluate(eval_dataset=rows, metric_key_prefix="heldout")
    assert set(out) == {"heldout_loss", "heldout_accuracy", "heldout_margin", "heldout_mean_reward"}
    # the same pairs the other way round: the margin flips, the mean reward does not move
    flipped = trainer.evaluate(eval_dataset=swapped)
    assert flipped["eval_margin"] == pytest.approx(-out["heldout_margin"], abs=1e-5)
    assert flipped["eval_mean_reward"] == pytest.approx(out["heldout_mean_reward"], abs=1e-5)


def test_chat_pairs_train(make_rm, tiny_tokenizer, cpu_args):
    args = RewardConfig(max_steps=2, per_device_train_batch_size=4, save_strategy="no", **cpu_args)
    trainer = RewardTrainer(make_rm(), args, train_dataset=pairs(8, chat=True), processing_class=tiny_tokenizer)
    row = trainer.train_dataset[0]
    assert tiny_tokenizer.decode(row["chosen_ids"]).startswith("<|user|>how was")
    trainer.train()


def test_loss_margin_and_centering(make_rm, tiny_tokenizer, cpu_args):
    args = RewardConfig(max_steps=1, center_rewards_coefficient=0.1, **cpu_args)
    trainer = RewardTrainer(make_rm(), args, train_dataset=pairs(4), processing_class=tiny_tokenizer)
    chosen, rejected, margin = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0]), torch.tensor([0.5, 0.0])
    expected = -F.logsigmoid(chosen - rejected - margin).mean() + 0.1 * ((chosen + rejected) ** 2).mean()
    torch.testing.assert_close(trainer._loss(chosen, rejected, margin, torch.tensor([False, False])), expected)
    assert trainer.train_dataset[0]["margin"] == 0.5 and trainer.train_dataset[0]["tie"] is False
    # a tie: the likelihood of a draw, -(log s(d) + log s(-d)) / 2, symmetric and smallest at d = 0
    tie = torch.tensor([False, True])
    d = chosen - rejected
    expected = (-F.logsigmoid(d[0] - 0.5) - 0.5 * (F.logsigmoid(d[1]) + F.logsigmoid(-d[1]))) / 2
    expected = expected + 0.1 * ((chosen + rejected) ** 2).mean()
    torch.testing.assert_close(trainer._loss(chosen, rejected, margin, tie), expected)
    swapped = trainer._loss(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0]), margin, tie)
    torch.testing.assert_close(swapped, expected)  # the tied side's order does not matter


def test_tied_pairs_pull_rewards_together(make_rm, tiny_tokenizer, cpu_args):
    """Ties exported by `rlhf-ext label export --ties keep` teach equal rewards, not a preference: trained on
    the same pairs marked tied, the model's chosen-rejected gap shrinks towards 0 (as a preference would grow it)."""
    rows = [{**r, "margin": 0.0, "tie": True} for r in pairs(32)]
    args = RewardConfig(
        max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1, save_strategy="no", **cpu_args
    )
    model = make_rm("gpt2")
    trainer = RewardTrainer(model, args, train_dataset=rows, processing_class=tiny_tokenizer)
    # start from a model that prefers "chosen" clearly, as one trained on these pairs as preferences does
    preferred = RewardTrainer(
        make_rm("gpt2"),
        RewardConfig(max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, save_strategy="no", **cpu_args),
        train_dataset=pairs(32),
        processing_class=tiny_tokenizer,
    )
    preferred.train()
    trainer.model.load_state_dict(preferred.model.state_dict())
    before = trainer.evaluate(eval_dataset=rows)["eval_tie_gap"]
    logs = [h for h in trainer.train().log_history if "loss" in h]
    after = trainer.evaluate(eval_dataset=rows)["eval_tie_gap"]
    assert before > 0.5 and after < 0.3 * before, (before, after)
    assert "accuracy" not in logs[0] and "tie_gap" in logs[0]  # no decisive pair: no accuracy to report


def test_tie_column_checks(make_rm, tiny_tokenizer, cpu_args):
    args = RewardConfig(max_steps=1, **cpu_args)
    with pytest.raises(ValueError, match="tied pair must have margin 0"):
        RewardTrainer(make_rm(), args, train_dataset=[{**pairs(1)[0], "tie": True}], processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="'tie' column must be a boolean"):
        RewardTrainer(
            make_rm(),
            args,
            train_dataset=[{**pairs(1)[0], "margin": 0.0, "tie": "yes"}],
            processing_class=tiny_tokenizer,
        )


def test_score_is_read_at_last_real_token_whatever_the_padding(make_rm, tiny_tokenizer):
    model = make_rm().eval()
    seqs = [tiny_tokenizer("the movie was great</s>")["input_ids"], tiny_tokenizer("bad</s>")["input_ids"]]
    alone = torch.stack(
        [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs]
    )
    for side in ("left", "right"):
        ids, mask = pad(seqs, tiny_tokenizer.pad_token_id, side)
        torch.testing.assert_close(sequence_scores(model, ids, mask), alone, rtol=1e-5, atol=1e-5)


def test_reward_bad_inputs(make_rm, make_lm, tiny_tokenizer, cpu_args):
    args = RewardConfig(max_steps=1, **cpu_args)
    with pytest.raises(ValueError, match="'chosen' and 'rejected'"):
        RewardTrainer(make_rm(), args, train_dataset=[{"chosen": "a"}], processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(make_rm(num_labels=2), args, train_dataset=pairs(4), processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardConfig(center_rewards_coefficient=-1.0, **cpu_args)
    with pytest.raises(ValueError, match="every pair is longer than max_length"):
        RewardTrainer(
            make_rm(), RewardConfig(max_length=3, **cpu_args), train_dataset=pairs(4), processing_class=tiny_tokenizer
        )
