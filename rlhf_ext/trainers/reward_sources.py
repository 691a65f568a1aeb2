"""Rewards from reward models and Python reward functions, combined as R = sum_i w_i * r_i.

A reward function is `f(prompts, completions, **columns) -> list[float]` (TRL's signature): `prompts`
are the dataset's prompt values (text or chat messages), `completions` the decoded completions (text,
or `[{"role": "assistant", "content": ...}]` for chat prompts); every other dataset column comes as a
keyword list, plus `completion_ids`. A reward model is an `AutoModelForSequenceClassification` with
`num_labels=1`, scored at the last real token. When it does not share the policy's tokenizer, the
completion is decoded and re-encoded with the reward model's own tokenizer. `RewardSources.score(rows, rollout)`
scores a sampled batch; `build_reward_sources` makes the sources from what a trainer was given.
"""

import logging
import math
import os
from typing import Optional

import torch

from rlhf_ext.generation import Rollout, response_texts
from rlhf_ext.models.heads import sequence_scores
from rlhf_ext.trainers.data import chat_ids, is_conversational, pad, text_ids
from rlhf_ext.trainers.loading import load_model, load_tokenizer

PROMPT_COLUMNS = ("prompt", "input_ids")  # the dataset columns that are not passed to reward functions

logger = logging.getLogger(__name__)


def source_name(source) -> str:
    if isinstance(source, torch.nn.Module):
        path = getattr(getattr(source, "config", None), "_name_or_path", "") or type(source).__name__
        return path.rstrip("/").split("/")[-1]
    return getattr(source, "__name__", type(source).__name__)


def _same_vocab(a, b) -> bool:
    return a is b or (
        a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)
    )


class RewardSources:
    """The reward models and functions of a trainer, in order (models first when built by PPOTrainer).

    `__call__` returns (total [B] float32, per_source [B, S] float32). A function may return None for a
    completion it does not apply to when `allow_none` (it becomes NaN in per_source and counts as 0 in
    the sum, as in TRL); NaN/inf values, wrong lengths and non-numbers are errors naming the function.
    """

    def __init__(
        self,
        sources: list,
        weights: Optional[list],
        processing_class,
        reward_processing_classes=None,
        forward_batch_size: int = 64,
        allow_none: bool = False,
    ):
        if not sources:
            raise ValueError("reward_model / reward_funcs: at least one reward source is required")
        for i, source in enumerate(sources):
            if not (callable(source) or isinstance(source, torch.nn.Module)):
                raise TypeError(
                    f"reward_funcs[{i}]: expected a callable or a sequence-classification model, "
                    f"got {type(source).__name__}"
                )
        if weights is None:
            weights = [1.0] * len(sources)
        if len(weights) != len(sources):
            raise ValueError(
                f"reward_weights: expected {len(sources)} weights (one per reward source: "
                f"{[source_name(s) for s in sources]}), got {len(weights)}"
            )
        if reward_processing_classes is None:
            reward_processing_classes = [None] * len(sources)
        if len(reward_processing_classes) != len(sources):
            raise ValueError(
                f"reward_processing_classes: expected {len(sources)} entries, got {len(reward_processing_classes)}"
            )
        self.sources = list(sources)
        self.names = [source_name(s) for s in sources]
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.tokenizer = processing_class
        self.forward_batch_size = forward_batch_size
        self.allow_none = allow_none
        self.reward_tokenizers = []  # None: score on the policy's token ids directly
        for i, (source, reward_tok) in enumerate(zip(self.sources, reward_processing_classes)):
            if not isinstance(source, torch.nn.Module):
                self.reward_tokenizers.append(None)
                continue
            num_labels = getattr(source.config, "num_labels", None)
            if num_labels != 1:
                raise ValueError(
                    f"reward model {self.names[i]!r}: expected num_labels=1 (a scalar score), got {num_labels}"
                )
            if reward_tok is not None and not _same_vocab(reward_tok, processing_class):
                self.reward_tokenizers.append(reward_tok)
                continue
            rows = source.get_input_embeddings().num_embeddings
            if rows < len(processing_class):
                raise ValueError(
                    f"reward model {self.names[i]!r}: its embedding table has {rows} rows but the policy tokenizer has "
                    f"{len(processing_class)} tokens, so they do not share a vocabulary. Pass the reward model's own "
                    "tokenizer (reward_processing_class) and completions will be decoded and re-encoded with it."
                )
            self.reward_tokenizers.append(None)

    def __len__(self):
        return len(self.sources)

    @torch.no_grad()
    def _score_model(self, model, reward_tok, prompts, completions, finished, sequences, attention_mask):
        if reward_tok is None:
            ids, mask = sequences, attention_mask
        else:
            texts = []
            for prompt, completion, done in zip(prompts, completions, finished.tolist()):
                if is_conversational(prompt):
                    ids = chat_ids(reward_tok, [*prompt, *completion], add_generation_prompt=False)
                else:
                    ids = text_ids(reward_tok, prompt + completion)
                    if done and reward_tok.eos_token_id is not None:
                        ids = ids + [reward_tok.eos_token_id]
                texts.append(ids)
            device = sequences.device
            ids, mask = pad(texts, reward_tok.pad_token_id or 0, "right", device)
        scores = [
            sequence_scores(model, ids[i : i + self.forward_batch_size], mask[i : i + self.forward_batch_size])
            for i in range(0, ids.shape[0], self.forward_batch_size)
        ]
        return torch.cat(scores).float().cpu()

    def _call_function(self, index, func, prompts, completions, columns):
        values = func(prompts=prompts, completions=completions, **columns)
        name = self.names[index]
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"reward function {name!r}: expected a list of floats, got {type(values).__name__}")
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {name!r}: returned {len(values)} rewards for {len(completions)} completions"
            )
        out = []
        for j, v in enumerate(values):
            if v is None:
                if not self.allow_none:
                    raise ValueError(
                        f"reward function {name!r}: returned None for completion {j}; "
                        "this trainer needs a number for every completion"
                    )
                out.append(math.nan)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(
                    f"reward function {name!r}: completion {j} got a {type(v).__name__} ({v!r}), expected a float"
                )
            if not math.isfinite(v):
                raise ValueError(f"reward function {name!r}: returned a non-finite reward ({v}) for completion {j}")
            out.append(float(v))
        return torch.tensor(out, dtype=torch.float32)

    def score(self, rows: dict, rollout: Rollout) -> tuple:
        """(scores [B] float32 on the rollout's device, per_source [B, S] float32 on the CPU) of a rollout sampled
        from the tokenized prompt `rows` (a dataset slice: its other columns go to the reward functions)."""
        prompts, completions, completion_ids = decode_completions(self.tokenizer, rows, rollout)
        total, per_source = self(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            finished=rollout.finished,
            sequences=rollout.sequences,
            attention_mask=rollout.attention_mask,
            columns={k: v for k, v in rows.items() if k not in PROMPT_COLUMNS},
        )
        return total.to(rollout.sequences.device), per_source

    def __call__(self, *, prompts, completions, completion_ids, finished, sequences, attention_mask, columns):
        """prompts/completions: lists of B; sequences/attention_mask: `[B, L]` prompt+completion in the
        policy's tokens; finished: `[B]` bool (EOS reached). Returns (total [B], per_source [B, S]) on CPU."""
        columns = {**columns, "completion_ids": completion_ids}
        per_source = []
        for i, (source, reward_tok) in enumerate(zip(self.sources, self.reward_tokenizers)):
            if isinstance(source, torch.nn.Module):
                per_source.append(
                    self._score_model(source, reward_tok, prompts, completions, finished, sequences, attention_mask)
                )
            else:
                per_source.append(self._call_function(i, source, prompts, completions, columns))
        per_source = torch.stack(per_source, dim=1)  # (B, S)
        all_none = torch.isnan(per_source).all(dim=1)
        if bool(all_none.any()):
            logger.warning(
                "every reward function returned None for %d completion(s); their reward is 0", int(all_none.sum())
            )
        total = torch.nansum(per_source * self.weights, dim=1)
        return total, per_source


def decode_completions(tokenizer, rows: dict, rollout: Rollout) -> tuple:
    """(prompts, completions, completion_ids) of a rollout sampled from the tokenized prompt `rows`: prompts as in
    the dataset (or decoded), completions as text, or `[{"role": "assistant", "content": text}]` when the prompt
    is a conversation, and each completion's token ids up to and including its stop token."""
    texts, completion_ids = response_texts(tokenizer, rollout)
    prompts = (
        rows["prompt"] if "prompt" in rows else tokenizer.batch_decode(rows["input_ids"], skip_special_tokens=True)
    )
    completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t for p, t in zip(prompts, texts)]
    return prompts, completions, completion_ids


def build_reward_sources(
    reward_model,
    reward_funcs,
    args,
    processing_class,
    prepare,
    *,
    reward_processing_class=None,
    reward_processing_classes=None,
    allow_none: bool = False,
    optional: bool = False,
) -> Optional[RewardSources]:
    """[reward_model, *reward_funcs] as a RewardSources weighted by args.reward_weights; local paths in
    reward_funcs load as reward models (with the tokenizer stored next to them), and every model goes through
    `prepare(model)` (the trainer freezes it on its device). reward_processing_class: the reward model's tokenizer;
    reward_processing_classes: one entry (or None) per reward_funcs entry, the tokenizer of a reward model that does
    not share the policy's. optional: None when there is no source (an environment's rewards can stand alone)."""
    funcs = (
        []
        if reward_funcs is None
        else list(reward_funcs)
        if isinstance(reward_funcs, (list, tuple))
        else [reward_funcs]
    )
    func_tokenizers = reward_processing_classes
    if func_tokenizers is not None and not isinstance(func_tokenizers, (list, tuple)):
        func_tokenizers = [func_tokenizers]
    if func_tokenizers is not None and len(func_tokenizers) != len(funcs):
        raise ValueError(
            f"reward_processing_classes: expected {len(funcs)} entries (one per reward_funcs entry), "
            f"got {len(func_tokenizers)}"
        )
    func_tokenizers = list(func_tokenizers or [None] * len(funcs))
    sources, tokenizers = [], []
    if reward_model is not None:
        sources.append(reward_model)
        tokenizers.append(reward_processing_class)
    for i, func in enumerate(funcs):
        if isinstance(func, (str, os.PathLike)):
            if func_tokenizers[i] is None:
                func_tokenizers[i] = load_tokenizer(None, func, f"reward_processing_classes[{i}]")
            func = load_model(func, "sequence_classification", args, f"reward_funcs[{i}]", num_labels=1)
        sources.append(func)
        tokenizers.append(func_tokenizers[i])
    if not sources and optional:
        return None
    if not sources:
        raise ValueError("reward_model / reward_funcs: pass a reward model, reward functions, or both")
    for source in sources:
        if isinstance(source, torch.nn.Module):
            prepare(source)
    return RewardSources(
        sources,
        args.reward_weights,
        processing_class,
        tokenizers,
        forward_batch_size=args.local_rollout_forward_batch_size,
        allow_none=allow_none,
    )
