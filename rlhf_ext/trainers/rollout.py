"""What on-policy trainers (PPO here; GRPO/RLOO build on it) share around the rollout: prompt datasets,
reward sources, scoring a rollout, and sampling completions for evaluation and samples.jsonl.

Expects the host trainer (a BaseTrainer) to have: args (with response_length, temperature, top_k, top_p,
min_p, stop_token, stop_token_id, max_prompt_length, local_rollout_forward_batch_size,
fused_linear_logprobs, logprobs_chunk_size, reward_weights), policy, ref_model, reward_sources,
eval_dataset.
"""
import json
import os
from typing import Optional

import torch

from rlhf_ext.generation import generate
from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.ops import kl_penalty
from rlhf_ext.trainers.common import load_model
from rlhf_ext.trainers.data import is_conversational, pad, tokenize_prompts
from rlhf_ext.trainers.rewards import RewardSources

PROMPT_COLUMNS = ("prompt", "input_ids")


class RolloutMixin:
    def tokenize_prompt_dataset(self, dataset, name: str):
        if dataset is None:
            return None
        if len(dataset) == 0:
            raise ValueError(f"{name}: is empty")
        return tokenize_prompts(dataset, self.processing_class, self.args.max_prompt_length, self.args.dataset_num_proc, name)

    @property
    def stop_token_id(self) -> Optional[int]:
        if self.args.stop_token_id is not None:
            return self.args.stop_token_id
        return self.processing_class.eos_token_id if self.args.stop_token == "eos" else None

    def build_reward_sources(self, reward_model, reward_funcs, reward_processing_class=None, allow_none=False) -> RewardSources:
        """[reward_model, *reward_funcs] as a RewardSources; local paths in reward_funcs load as reward models."""
        funcs = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        sources, tokenizers = [], []
        if reward_model is not None:
            sources.append(reward_model)
            tokenizers.append(reward_processing_class)
        for i, func in enumerate(funcs):
            if isinstance(func, (str, os.PathLike)):
                func = load_model(func, "sequence_classification", self.args, f"reward_funcs[{i}]", num_labels=1)
            sources.append(func)
            tokenizers.append(None)
        if not sources:
            raise ValueError("reward_model / reward_funcs: pass a reward model, reward functions, or both")
        for source in sources:
            if isinstance(source, torch.nn.Module):
                self.prepare_model(source, trainable=False)
        return RewardSources(sources, self.args.reward_weights, self.processing_class, tokenizers,
                             forward_batch_size=self.args.local_rollout_forward_batch_size, allow_none=allow_none)

    def reference_logprobs(self, ids, attn, P):
        """`[B, R]` log-probs of the responses ids[:, P:] under the frozen reference policy (LoRA support
        will compute them with the adapter disabled instead of a second model)."""
        args = self.args
        with self.autocast():
            return sequence_logprobs(self.ref_model, ids, attn, P, temperature=args.temperature,
                                     fused_linear=args.fused_linear_logprobs, chunk_size=args.logprobs_chunk_size)

    def decode_completions(self, rows: dict, rollout):
        """(prompts, completions, completion_ids): prompts as in the dataset (or decoded), completions as
        text, or `[{"role": "assistant", "content": text}]` when the prompt is a conversation."""
        tok = self.processing_class
        lengths = rollout.response_mask.sum(1).tolist()
        completion_ids = [ids[:n] for ids, n in zip(rollout.response_ids.tolist(), lengths)]
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = rows["prompt"] if "prompt" in rows else tok.batch_decode(rows["input_ids"], skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] if is_conversational(p) else t for p, t in zip(prompts, texts)]
        return prompts, completions, completion_ids

    def score_rollout(self, rows: dict, rollout, prompt_mask, attn):
        """(scores [B] float32 on device, per_source [B, S]) for one rollout."""
        prompts, completions, completion_ids = self.decode_completions(rows, rollout)
        columns = {k: v for k, v in rows.items() if k not in PROMPT_COLUMNS}
        total, per_source = self.reward_sources(
            prompts=prompts, completions=completions, completion_ids=completion_ids, finished=rollout.finished,
            sequences=rollout.sequences, attention_mask=attn, columns=columns,
        )
        return total.to(self.device), per_source

    @torch.no_grad()
    def generate_completions(self, dataset=None, max_rows: Optional[int] = None, greedy: bool = False, seed: Optional[int] = None):
        """Sample (or greedily decode) completions for a tokenized prompt dataset (default: eval_dataset) and
        score them. Returns [{"prompt", "completion", "score", "kl", "finished"}]. Uses its own RNG, so
        calling it never changes the training run."""
        args, tok = self.args, self.processing_class
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("generate_completions: no dataset given and no eval_dataset")
        count = len(dataset) if max_rows is None else min(max_rows, len(dataset))
        generator = torch.Generator(device=self.device).manual_seed(args.seed if seed is None else seed)
        self.policy.eval()
        results = []
        for first in range(0, count, args.per_device_eval_batch_size):
            rows = dataset[first : min(count, first + args.per_device_eval_batch_size)]
            prompt_ids, prompt_mask = pad(rows["input_ids"], tok.pad_token_id, "left", self.device)
            rollout = generate(
                self.policy, prompt_ids, prompt_mask, max_new_tokens=args.response_length, temperature=args.temperature,
                top_k=1 if greedy else args.top_k, top_p=args.top_p, min_p=args.min_p, eos_token_id=self.stop_token_id,
                pad_token_id=tok.pad_token_id, generator=generator,
            )
            attn = torch.cat([prompt_mask, rollout.response_mask.long()], dim=1)
            scores, _ = self.score_rollout(rows, rollout, prompt_mask, attn)
            mask = rollout.response_mask.float()
            with self.autocast():
                policy_lp = sequence_logprobs(self.policy, rollout.sequences, attn, rollout.prompt_length,
                                              temperature=args.temperature)
            ref_lp = self.reference_logprobs(rollout.sequences, attn, rollout.prompt_length)
            kl = (kl_penalty(policy_lp, ref_lp, "k1") * mask).sum(1)
            prompts, completions, _ = self.decode_completions(rows, rollout)
            for i in range(len(prompts)):
                results.append({"prompt": prompts[i], "completion": completions[i], "score": float(scores[i]),
                                "kl": float(kl[i]), "finished": bool(rollout.finished[i])})
        return results

    def evaluate(self) -> dict:
        """Mean score, KL to the reference and EOS rate of sampled completions on eval_dataset."""
        results = self.generate_completions()
        n = len(results)
        return {"eval/scores": sum(r["score"] for r in results) / n, "eval/kl": sum(r["kl"] for r in results) / n,
                "eval/eos_fraction": sum(r["finished"] for r in results) / n}

    def evaluate_and_log(self):
        self.reporter.evaluated(self.evaluate())

    def write_samples(self, step: int, max_rows: int = 8):
        """Append a few eval completions to <output_dir>/samples.jsonl."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "samples.jsonl"), "a") as fh:
            for sample in self.generate_completions(max_rows=max_rows):
                fh.write(json.dumps({"step": step, **sample}, default=str) + "\n")
