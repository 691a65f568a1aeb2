"""Supervised fine-tuning: next-token loss on text, prompt/completion pairs or chat conversations.

Dataset columns (first match wins): `formatting_func(row) -> str` if given; `messages` (chat, rendered
with the tokenizer's chat template; with `assistant_only_loss` only assistant turns are trained);
`prompt` + `completion` (text or chat; by default only the completion is trained); else the
`dataset_text_field` column (default "text"). Text gets EOS appended so the model learns to stop.
The loss is the mean token NLL over all trained tokens of the accumulation window, computed from the
hidden states with the fused linear+log-softmax op (no `[B, L, V]` logits).
"""

from collections.abc import Callable
from typing import Optional

import torch

from rlhf_ext.models.heads import causal_lm_token_logprobs
from rlhf_ext.trainers.base import BaseTrainer
from rlhf_ext.trainers.data import chat_ids, is_conversational, pad, text_ids
from rlhf_ext.trainers.loading import load_model, load_padding_tokenizer
from rlhf_ext.trainers.sft_config import SFTConfig

__all__ = ["SFTConfig", "SFTTrainer", "tokenize_sft_row"]


def tokenize_sft_row(row: dict, tokenizer, args: SFTConfig, formatting_func=None) -> dict:
    """{"input_ids": [...], "completion_mask": [...]} with completion_mask 1 on trained tokens."""
    eos_id = tokenizer.convert_tokens_to_ids(args.eos_token) if args.eos_token else tokenizer.eos_token_id

    def with_eos(ids):
        return ids if ids and ids[-1] == eos_id else ids + [eos_id]

    if formatting_func is not None:
        ids = with_eos(text_ids(tokenizer, formatting_func(row)))
        mask = [1] * len(ids)
    elif "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
        mask = [0 if args.assistant_only_loss else 1] * len(ids)
        if args.assistant_only_loss:
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
                end_ids = chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
                if ids[: len(end_ids)] != end_ids:
                    raise ValueError(
                        "assistant_only_loss: the chat template does not render a conversation prefix as a token prefix"
                    )
                mask[start : len(end_ids)] = [1] * (len(end_ids) - start)
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if is_conversational(prompt):
            prompt_part = chat_ids(tokenizer, prompt, add_generation_prompt=True)
            ids = chat_ids(tokenizer, [*prompt, *completion], add_generation_prompt=False)
            if ids[: len(prompt_part)] != prompt_part:
                raise ValueError("completion_only_loss: the chat template does not render the prompt as a token prefix")
        else:
            prompt_part = text_ids(tokenizer, prompt)
            ids = with_eos(prompt_part + text_ids(tokenizer, completion, add_special_tokens=False))
        train_prompt = args.completion_only_loss is False
        mask = [1 if train_prompt else 0] * len(prompt_part) + [1] * (len(ids) - len(prompt_part))
    elif args.dataset_text_field in row:
        ids = with_eos(text_ids(tokenizer, row[args.dataset_text_field]))
        mask = [1] * len(ids)
    else:
        raise ValueError(
            f"train_dataset: expected a {args.dataset_text_field!r} column, 'messages', or 'prompt' + 'completion'; "
            f"got columns {list(row)}"
        )
    if args.max_length is not None:
        ids, mask = ids[: args.max_length], mask[: args.max_length]
    return {"input_ids": ids, "completion_mask": mask}


class SFTTrainer(BaseTrainer):
    """`SFTTrainer(model, args, train_dataset, eval_dataset=None, processing_class=None, callbacks=None,
    optimizers=(None, None), peft_config=None, formatting_func=None)`; model: a causal LM or a local path."""

    metric_keys = ("loss", "grad_norm", "learning_rate", "num_tokens")
    progress_keys = {"loss": "loss"}

    def __init__(
        self,
        model,
        args: Optional[SFTConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        formatting_func: Optional[Callable] = None,
        data_collator=None,
    ):
        args = args if args is not None else SFTConfig()
        if data_collator is not None:
            raise ValueError("data_collator: not supported; SFTTrainer pads and masks batches itself")
        tokenizer = load_padding_tokenizer(processing_class, model)
        super().__init__(args, tokenizer, callbacks)
        self.model = self.prepare_model(
            self.apply_peft(load_model(model, "causal_lm", args), peft_config), trainable=True
        )
        self._optimizers = optimizers

        def tokenize(data, name):
            return data.map(
                lambda row: tokenize_sft_row(row, tokenizer, args, formatting_func),
                remove_columns=data.column_names,
                num_proc=args.dataset_num_proc,
            )

        self.load_datasets(train_dataset, eval_dataset, tokenize)

    def models_to_save(self) -> dict:
        return {"": self.model}

    def _batch(self, rows: dict):
        ids, mask = pad(rows["input_ids"], self.processing_class.pad_token_id, "right", self.device)
        trained, _ = pad(rows["completion_mask"], 0, "right", self.device)
        labels = torch.where(trained.bool(), ids, torch.full_like(ids, -100))
        return ids, mask, labels

    def _token_nll_sum(self, ids, mask, labels):
        with self.autocast():
            logprobs = causal_lm_token_logprobs(self.model, ids, mask, labels, self.args.fused_linear_logprobs)
        return -logprobs.sum()

    def train(self, resume_from_checkpoint=None):
        return self.train_windows(self.model, resume_from_checkpoint, self._train_window)

    def _train_window(self, rows: dict, step: int) -> dict:
        micro = self.args.per_device_train_batch_size
        ids, mask, labels = self._batch(rows)
        num_tokens = int((labels[:, 1:] != -100).sum())  # the loss is a mean over the whole window
        if num_tokens == 0:
            raise ValueError(
                f"step {step}: no trained token in the batch (is completion_only_loss masking everything?)"
            )
        loss_sum = 0.0
        for start_row in range(0, ids.shape[0], micro):
            part = slice(start_row, start_row + micro)
            nll = self._token_nll_sum(ids[part], mask[part], labels[part])
            (nll / num_tokens).backward()
            loss_sum += float(nll.detach())
        return {
            "loss": loss_sum / num_tokens,
            **self.step_optimizer(list(self.model.parameters())),
            "num_tokens": num_tokens,
        }

    def evaluate(self) -> dict:
        """Mean token NLL on eval_dataset as {"eval_loss": ...}."""

        def nll_and_tokens(rows):
            ids, mask, labels = self._batch(rows)
            return float(self._token_nll_sum(ids, mask, labels)), int((labels[:, 1:] != -100).sum())

        parts = self.map_eval_batches(self.model, self.eval_dataset, nll_and_tokens)
        return {"eval_loss": sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1)}
