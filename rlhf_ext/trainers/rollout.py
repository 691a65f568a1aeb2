"""What on-policy trainers (PPO here; GRPO/RLOO build on it) share around the rollout: prompt datasets,
reward sources, scoring a rollout, and sampling completions for evaluation and samples.jsonl.

Expects the host trainer (a BaseTrainer) to have: args (with response_length, temperature, top_k, top_p,
min_p, stop_token, stop_token_id, max_prompt_length, local_rollout_forward_batch_size,
fused_linear_logprobs, logprobs_chunk_size, reward_weights), policy, ref_model (None: the policy with its
LoRA adapter disabled, or no reference at all), reward_sources, eval_dataset.

Sampling is keyed, not streamed: the completions of rows [g, g + chunk) of the global batch of a step are
drawn with a generator seeded from (seed, step, g). A run therefore samples the same completions whatever
the number of processes it is split over (given the same chunk size), and a resumed run needs no
generator state.
"""

import dataclasses
import json
import os
import time
from typing import Optional

import torch

from rlhf_ext.generation import generate
from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.ops import kl_penalty
from rlhf_ext.trainers.common import load_model, load_tokenizer
from rlhf_ext.trainers.data import is_conversational, pad, tokenize_prompts
from rlhf_ext.trainers.lora import is_peft_model
from rlhf_ext.trainers.rewards import RewardSources

PROMPT_COLUMNS = ("prompt", "input_ids")


class RolloutMixin:
    def tokenize_prompt_dataset(self, dataset, name: str):
        return tokenize_prompts(
            dataset, self.processing_class, self.args.max_prompt_length, self.args.dataset_num_proc, name
        )

    @property
    def stop_token_id(self) -> Optional[int]:
        if self.args.stop_token_id is not None:
            return self.args.stop_token_id
        return self.processing_class.eos_token_id if self.args.stop_token == "eos" else None

    def build_reward_sources(
        self, reward_model, reward_funcs, reward_processing_class=None, allow_none=False, reward_processing_classes=None
    ) -> RewardSources:
        """[reward_model, *reward_funcs] as a RewardSources; local paths in reward_funcs load as reward models
        (with the tokenizer stored next to them). reward_processing_classes: one entry (or None) per
        reward_funcs entry, the tokenizer of a reward model that does not share the policy's."""
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
                func = load_model(func, "sequence_classification", self.args, f"reward_funcs[{i}]", num_labels=1)
            sources.append(func)
            tokenizers.append(func_tokenizers[i])
        if not sources:
            raise ValueError("reward_model / reward_funcs: pass a reward model, reward functions, or both")
        for source in sources:
            if isinstance(source, torch.nn.Module):
                self.prepare_model(source, trainable=False)
        return RewardSources(
            sources,
            self.args.reward_weights,
            self.processing_class,
            tokenizers,
            forward_batch_size=self.args.local_rollout_forward_batch_size,
            allow_none=allow_none,
        )

    @property
    def has_reference(self) -> bool:
        return self.ref_model is not None or is_peft_model(self.policy)

    def reference_logprobs(self, ids, attn, P):
        """`[B, R]` log-probs of the responses ids[:, P:] under the frozen reference policy: `ref_model`, or
        with LoRA the policy with its adapter disabled (no second copy of the weights)."""
        args = self.args
        kwargs = dict(
            temperature=args.temperature, fused_linear=args.fused_linear_logprobs, chunk_size=args.logprobs_chunk_size
        )
        with torch.no_grad(), self.autocast():
            if self.ref_model is not None:
                return self.run(self.ref_model, sequence_logprobs, ids, attn, P, **kwargs)
            if not is_peft_model(self.policy):
                raise RuntimeError(
                    "reference_logprobs: this trainer has no reference policy (no ref_model, no adapter)"
                )
            with self.policy.disable_adapter():
                return self.run(self.policy, sequence_logprobs, ids, attn, P, **kwargs)

    def sample(
        self,
        prompt_ids,
        prompt_mask,
        *,
        step: int,
        row_offset: int = 0,
        chunk_size: Optional[int] = None,
        greedy: bool = False,
        max_new_tokens: Optional[int] = None,
    ):
        """Completions for left-padded prompts `[B, P]`, generated `chunk_size` rows at a time; the chunk that
        starts at global row `row_offset + i` draws from a generator seeded by (seed, step, row_offset + i)."""
        args, tok = self.args, self.processing_class
        B = prompt_ids.shape[0]
        chunk_size = chunk_size or B
        parts = []
        with self.gathered(self.policy):  # FSDP: weights in full, no collective inside (decode lengths differ by rank)
            for start in range(0, B, chunk_size):
                rows = slice(start, start + chunk_size)
                key = (args.seed * 1_000_003 + step) * 1_000_033 + row_offset + start
                generator = torch.Generator(device=self.device).manual_seed(key % (2**63 - 1))
                parts.append(
                    generate(
                        self.policy,
                        prompt_ids[rows],
                        prompt_mask[rows],
                        max_new_tokens=max_new_tokens or args.response_length,
                        temperature=args.temperature,
                        top_k=1 if greedy else args.top_k,
                        top_p=args.top_p,
                        min_p=args.min_p,
                        eos_token_id=self.stop_token_id,
                        pad_token_id=tok.pad_token_id,
                        generator=generator,
                    )
                )
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, tok.pad_token_id)

    def roll_out(self, rows: dict, *, step: int, row_offset: int = 0, chunk_size: Optional[int] = None):
        """Left-pad this process's prompts `rows["input_ids"]`, put the policy in eval mode and `sample`.
        Returns (rollout, prompt_mask [B, P], attention mask of prompt + response [B, P + R], seconds)."""
        timer = time.perf_counter()
        prompt_ids, prompt_mask = pad(rows["input_ids"], self.processing_class.pad_token_id, "left", self.device)
        self.policy.eval()
        rollout = self.sample(prompt_ids, prompt_mask, step=step, row_offset=row_offset, chunk_size=chunk_size)
        attn = torch.cat([prompt_mask, rollout.response_mask.long()], dim=1)
        return rollout, prompt_mask, attn, time.perf_counter() - timer

    def forward_chunks(self, rows: int) -> list:
        """Row slices of local_rollout_forward_batch_size for the no-grad scoring passes."""
        size = self.args.local_rollout_forward_batch_size
        return [slice(i, i + size) for i in range(0, rows, size)]

    def decode_completions(self, rows: dict, rollout):
        """(prompts, completions, completion_ids): prompts as in the dataset (or decoded), completions as
        text, or `[{"role": "assistant", "content": text}]` when the prompt is a conversation."""
        tok = self.processing_class
        lengths = rollout.response_mask.sum(1).tolist()
        completion_ids = [ids[:n] for ids, n in zip(rollout.response_ids.tolist(), lengths)]
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = rows["prompt"] if "prompt" in rows else tok.batch_decode(rows["input_ids"], skip_special_tokens=True)
        completions = [
            [{"role": "assistant", "content": t}] if is_conversational(p) else t for p, t in zip(prompts, texts)
        ]
        return prompts, completions, completion_ids

    def score_rollout(self, rows: dict, rollout, prompt_mask, attn):
        """(scores [B] float32 on device, per_source [B, S]) for one rollout."""
        prompts, completions, completion_ids = self.decode_completions(rows, rollout)
        columns = {k: v for k, v in rows.items() if k not in PROMPT_COLUMNS}
        total, per_source = self.reward_sources(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            finished=rollout.finished,
            sequences=rollout.sequences,
            attention_mask=attn,
            columns=columns,
        )
        return total.to(self.device), per_source

    @torch.no_grad()
    def generate_completions(
        self, dataset=None, max_rows: Optional[int] = None, greedy: bool = False, seed: Optional[int] = None
    ):
        """Sample (or greedily decode) completions for a tokenized prompt dataset (default: eval_dataset) and
        score them. Returns [{"prompt", "completion", "score", "kl", "finished"}]. Uses its own RNG, so
        calling it never changes the training run."""
        args = self.args
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("generate_completions: no dataset given and no eval_dataset")
        count = len(dataset) if max_rows is None else min(max_rows, len(dataset))
        generator = torch.Generator(device=self.device).manual_seed(args.seed if seed is None else seed)
        self.policy.eval()
        with self.gathered(self.policy, self.ref_model):  # FSDP: every rank runs this; no collective inside
            return self._completions(dataset, count, greedy, generator)

    def _completions(self, dataset, count: int, greedy: bool, generator) -> list:
        args, tok = self.args, self.processing_class
        results = []
        for first in range(0, count, args.per_device_eval_batch_size):
            rows = dataset[first : min(count, first + args.per_device_eval_batch_size)]
            prompt_ids, prompt_mask = pad(rows["input_ids"], tok.pad_token_id, "left", self.device)
            rollout = generate(
                self.policy,
                prompt_ids,
                prompt_mask,
                max_new_tokens=args.response_length,
                temperature=args.temperature,
                top_k=1 if greedy else args.top_k,
                top_p=args.top_p,
                min_p=args.min_p,
                eos_token_id=self.stop_token_id,
                pad_token_id=tok.pad_token_id,
                generator=generator,
            )
            attn = torch.cat([prompt_mask, rollout.response_mask.long()], dim=1)
            scores, _ = self.score_rollout(rows, rollout, prompt_mask, attn)
            mask = rollout.response_mask.float()
            with self.autocast():
                policy_lp = sequence_logprobs(
                    self.policy, rollout.sequences, attn, rollout.prompt_length, temperature=args.temperature
                )
            kl = [None] * len(scores)  # no reference policy (e.g. GRPO with beta = 0): no KL to report
            if self.has_reference:
                ref_lp = self.reference_logprobs(rollout.sequences, attn, rollout.prompt_length)
                kl = (kl_penalty(policy_lp, ref_lp, "k1") * mask).sum(1).tolist()
            prompts, completions, _ = self.decode_completions(rows, rollout)
            for i in range(len(prompts)):
                results.append(
                    {
                        "prompt": prompts[i],
                        "completion": completions[i],
                        "score": float(scores[i]),
                        "kl": kl[i],
                        "finished": bool(rollout.finished[i]),
                    }
                )
        return results

    def evaluate(self) -> dict:
        """Mean score, KL to the reference (when there is one) and EOS rate of sampled completions on eval_dataset."""
        results = self.generate_completions()
        n = len(results)
        metrics = {
            "eval/scores": sum(r["score"] for r in results) / n,
            "eval/eos_fraction": sum(r["finished"] for r in results) / n,
        }
        if self.has_reference:
            metrics["eval/kl"] = sum(r["kl"] for r in results) / n
        return metrics

    def evaluate_and_log(self):
        self.reporter.evaluated(self.evaluate())

    def write_samples(self, step: int, max_rows: int = 8):
        """Append a few eval completions to <output_dir>/samples.jsonl (rank 0 writes; with FSDP every rank
        must call this, as the sharded weights are gathered for it)."""
        if not self.dist.is_main and not self._sharded:
            return
        samples = self.generate_completions(max_rows=max_rows)
        if not self.dist.is_main:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "samples.jsonl"), "a") as fh:
            for sample in samples:
                fh.write(json.dumps({"step": step, **sample}, default=str) + "\n")


def concat_rollouts(parts: list, pad_token_id: int):
    """One Rollout from chunks generated for consecutive rows of the same left-padded prompt batch: the
    response columns are padded to the longest chunk (pad id for token ids, 0 for masks/log-probs)."""
    R = max(p.response_ids.shape[1] for p in parts)
    P = parts[0].prompt_length
    fields = {}
    for f in dataclasses.fields(parts[0]):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "prompt_length":
            fields[f.name] = P
        elif values[0] is None:
            fields[f.name] = None
        elif values[0].dim() == 1 or f.name == "prompt_mask":
            fields[f.name] = torch.cat(values)
        else:
            width = P + R if f.name == "sequences" else R
            fill = pad_token_id if f.name in ("sequences", "response_ids") else 0
            fields[f.name] = torch.cat(
                [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in values]
            )
    return type(parts[0])(**fields)
