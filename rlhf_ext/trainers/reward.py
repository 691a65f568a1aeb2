"""Reward-model training: the pairwise Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin). (What PPO and
GRPO score completions with, reward models and functions together, is rlhf_ext.trainers.reward_sources.)

Dataset columns: `chosen` and `rejected` (text, or chat conversations), optionally a `prompt` (text or
chat messages) that both continue, an optional `margin` column, and an optional boolean `tie` column (as
`rlhf-ext label export --ties keep` writes): a tied pair says neither side is better, so its loss is the
Bradley-Terry likelihood of a draw, -(log sigmoid(d) + log sigmoid(-d)) / 2 with d = r_chosen - r_rejected,
which is smallest when the two rewards are equal (its margin must be 0). `accuracy` counts decisive pairs
only; `tie_gap` is the mean |d| over tied pairs. Text examples get EOS appended (the
score is read at the last real token, which for a finished PPO completion is EOS too). Optional reward
centring (`center_rewards_coefficient`) adds c * mean((r_chosen + r_rejected)^2). The model is an
`AutoModelForSequenceClassification` with `num_labels=1`; its backbone and `score` head are run by
`rlhf_ext.models.heads.sequence_scores`, the same function PPO scores with.
"""

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from rlhf_ext.models.heads import score_head, sequence_scores
from rlhf_ext.trainers.base import BaseTrainer
from rlhf_ext.trainers.data import chat_ids, is_conversational, pad, prepare_dataset, text_ids
from rlhf_ext.trainers.loading import load_model, load_padding_tokenizer
from rlhf_ext.trainers.reward_config import RewardConfig

__all__ = ["RewardConfig", "RewardTrainer", "tokenize_pair"]

logger = logging.getLogger(__name__)


def _check_text(value, column: str, where: str, allow_none: bool = False):
    """`value` is text (valid UTF-8) or chat messages; else a ValueError naming the row and column."""
    if value is None and allow_none:
        return
    if is_conversational(value):
        return
    if not isinstance(value, str):
        got = "missing or null" if value is None else f"a {type(value).__name__}"
        raise ValueError(f"{where}: column {column!r} must be text or chat messages, got {got}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: column {column!r} is not valid UTF-8 text (character {err.start}: {value[err.start]!r})"
        ) from None


def tokenize_pair(row: dict, tokenizer, index: int = 0, name: str = "train_dataset") -> dict:
    where = f"{name}: row {index}"
    for column in ("chosen", "rejected"):
        if column not in row:
            raise ValueError(f"{name}: expected 'chosen' and 'rejected' columns, got {list(row)}")
        _check_text(row[column], column, where)
    prompt = row.get("prompt")
    _check_text(prompt, "prompt", where, allow_none=True)

    def encode(completion, column):
        if is_conversational(completion) or is_conversational(prompt):
            return chat_ids(tokenizer, [*(prompt or []), *completion], add_generation_prompt=False)
        ids = text_ids(tokenizer, (prompt or "") + completion)
        if not ids:  # nothing to score but the appended EOS
            raise ValueError(f"{where}: 'prompt' and {column!r} are both empty")
        return ids if ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]

    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"{where}: column 'margin' must be a number, got {margin!r:.60}")
    margin = 0.0 if margin is None else float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"{where}: column 'margin' must be a finite number, got {margin}")
    tie = row.get("tie")
    if tie not in (None, True, False, 0, 1):
        raise ValueError(f"{where}: the 'tie' column must be a boolean, got {tie!r}")
    if tie and margin != 0.0:
        raise ValueError(f"{where}: a tied pair must have margin 0 (neither side is better), got margin={margin}")
    return {
        "chosen_ids": encode(row["chosen"], "chosen"),
        "rejected_ids": encode(row["rejected"], "rejected"),
        "margin": margin,
        "tie": bool(tie),
    }


class RewardTrainer(BaseTrainer):
    """`RewardTrainer(model, args, train_dataset, eval_dataset=None, processing_class=None, peft_config=None,
    callbacks=None, optimizers=(None, None))`; model: a sequence classifier (num_labels=1) or a local path
    (a causal LM checkpoint gets a fresh score head, which this trainer trains)."""

    # accuracy: when the batch has decisive pairs; tie_gap: when it has tied ones
    metric_keys = ("loss", "grad_norm", "learning_rate", "margin", "mean_reward", "accuracy", "tie_gap")
    progress_keys = {"loss": "loss", "acc": "accuracy"}

    def __init__(
        self,
        model,
        args: Optional[RewardConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
        data_collator=None,
    ):
        args = args if args is not None else RewardConfig()
        if data_collator is not None:
            raise ValueError("data_collator: not supported; RewardTrainer pads pairs itself")
        tokenizer = load_padding_tokenizer(processing_class, model)
        super().__init__(args, tokenizer, callbacks)
        model = load_model(model, "sequence_classification", args, num_labels=1)
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"model: expected a sequence classifier with num_labels=1, got num_labels={model.config.num_labels}"
            )
        if model.config.pad_token_id is None:  # keeps HF's own forward usable on this model after training
            model.config.pad_token_id = tokenizer.pad_token_id
        model = self.apply_peft(model, peft_config)
        if peft_config is not None and not any(p.requires_grad for p in score_head(model).parameters()):
            raise ValueError(
                "peft_config: the score head would stay frozen at its random initialisation; use "
                "LoraConfig(task_type='SEQ_CLS', ...) (peft then trains the head) or modules_to_save=['score']"
            )
        self.model = self.prepare_model(model, trainable=True)
        self._optimizers = optimizers
        self.load_datasets(train_dataset, eval_dataset, self._tokenize)

    def _tokenize(self, data, name):
        data = data.map(
            lambda row, index: tokenize_pair(row, self.processing_class, index, name),
            with_indices=True,
            remove_columns=data.column_names,
            num_proc=self.args.dataset_num_proc,
        )
        if self.args.max_length is not None:
            limit = self.args.max_length
            before = len(data)
            data = data.filter(lambda row: len(row["chosen_ids"]) <= limit and len(row["rejected_ids"]) <= limit)
            if len(data) < before:
                logger.warning(
                    "%s: dropped %d of %d pairs longer than max_length=%d", name, before - len(data), before, limit
                )
            if len(data) == 0:
                raise ValueError(f"{name}: every pair is longer than max_length={limit}")
        return data

    def models_to_save(self) -> dict:
        return {"": self.model}

    def _pair_scores(self, rows: dict):
        """(r_chosen [b], r_rejected [b], margin [b], tie [b] bool) for b pairs, in one forward over 2b sequences."""
        ids, mask = pad(
            rows["chosen_ids"] + rows["rejected_ids"], self.processing_class.pad_token_id, "right", self.device
        )
        with self.autocast():
            scores = sequence_scores(self.model, ids, mask)
        b = len(rows["chosen_ids"])
        margin = torch.tensor(rows["margin"], dtype=torch.float32, device=scores.device)
        tie = torch.tensor(rows["tie"], dtype=torch.bool, device=scores.device)
        return scores[:b], scores[b:], margin, tie

    def _loss(self, chosen, rejected, margin, tie):
        d = chosen - rejected
        draw = -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))  # a tie: smallest when the two rewards are equal
        loss = torch.where(tie, draw, -F.logsigmoid(d - margin)).mean()
        if self.args.center_rewards_coefficient:
            loss = loss + self.args.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        return loss

    @staticmethod
    def _pair_metrics(chosen, rejected, tie) -> dict:
        """accuracy over decisive pairs (absent when a batch has none), tie_gap over tied ones (when any)."""
        d = chosen - rejected
        metrics = {"margin": float(d.mean()), "mean_reward": float(torch.cat([chosen, rejected]).mean())}
        if (~tie).any():
            metrics["accuracy"] = float((d[~tie] > 0).float().mean())
        if tie.any():
            metrics["tie_gap"] = float(d[tie].abs().mean())
        return metrics

    def train(self, resume_from_checkpoint=None):
        return self.train_windows(self.model, resume_from_checkpoint, self._train_window)

    def _train_window(self, rows: dict, step: int) -> dict:
        micro = self.args.per_device_train_batch_size
        window = len(rows["chosen_ids"])
        loss_sum, all_chosen, all_rejected, all_tie = 0.0, [], [], []
        for first in range(0, window, micro):
            part = {k: v[first : first + micro] for k, v in rows.items()}
            chosen, rejected, margin, tie = self._pair_scores(part)
            loss = self._loss(chosen, rejected, margin, tie) * (len(part["chosen_ids"]) / window)
            loss.backward()
            loss_sum += float(loss.detach())
            all_chosen.append(chosen.detach())
            all_rejected.append(rejected.detach())
            all_tie.append(tie)
        return {
            "loss": loss_sum,
            **self.step_optimizer(list(self.model.parameters())),
            **self._pair_metrics(torch.cat(all_chosen), torch.cat(all_rejected), torch.cat(all_tie)),
        }

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict:
        """{"eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"} on `eval_dataset` (pairs in the
        train_dataset formats; default: the trainer's eval_dataset). `metric_key_prefix` replaces "eval"."""
        data = (
            self.eval_dataset if eval_dataset is None else prepare_dataset(eval_dataset, "eval_dataset", self._tokenize)
        )
        if data is None:
            raise ValueError("eval_dataset: none given to evaluate() and none passed to RewardTrainer")
        parts = self.map_eval_batches(self.model, data, self._pair_scores)
        chosen, rejected, margins, ties = (torch.cat(column) for column in zip(*parts))
        metrics = {
            "loss": float(self._loss(chosen, rejected, margins, ties)),
            **self._pair_metrics(chosen, rejected, ties),
        }
        return {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
