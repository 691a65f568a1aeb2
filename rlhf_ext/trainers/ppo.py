"""PPO with a critic (InstructGPT / TRL's PPOTrainer), built on the fused ops.

One step, as read top to bottom in `train` / `make_experience` / `ppo_update`:
  prompts -> `generate` (KV-cached sampling) -> old log-probs, reference log-probs, values, scores
  -> per-token reward: -kl_coef * KL(policy || ref) on every response token, + score on the last real one
  -> `gae` -> `masked_whiten` -> num_ppo_epochs x num_mini_batches minibatch updates with `ppo_loss`
     (gradient accumulation over per_device_train_batch_size micro-batches, gradient clipping)
  -> adaptive KL coefficient (when target_kl is set), learning-rate schedule.
Batch sizes follow TRL (see PPOConfig): one step samples per_device_train_batch_size *
gradient_accumulation_steps prompts per process and splits them into num_mini_batches minibatches.
Under torchrun / accelerate launch each process takes its share of the step's prompts; reward
normalisation, whitening, the KL controller, early stopping and the metrics use statistics over all
processes, and gradients are averaged across them (rlhf_ext.trainers.distributed).
With `peft_config` only the adapter trains and the reference policy is the policy with the adapter disabled.
"""

import copy
import time
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn
from transformers import TrainerState

from rlhf_ext.models.heads import (
    ValueHead,
    critic_from_causal_lm,
    hidden_states,
    last_token_index,
    logprobs_and_values,
    position_ids_from_mask,
    score_head,
    token_values,
)
from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.ops import gae, kl_penalty, masked_var, ppo_loss
from rlhf_ext.trainers.common import BaseTrainer, load_model, load_tokenizer
from rlhf_ext.trainers.data import StepBatches, require_pad_token
from rlhf_ext.trainers.distributed import global_masked_whiten
from rlhf_ext.trainers.lora import is_peft_model
from rlhf_ext.trainers.ppo_config import PPOConfig
from rlhf_ext.trainers.rollout import RolloutMixin


class PPOTrainer(RolloutMixin, BaseTrainer):
    """`PPOTrainer(args, processing_class, model, ref_model=None, reward_model=None, train_dataset=None,
    value_model=None, data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
    peft_config=None, *, reward_funcs=None, reward_processing_class=None)`: TRL's positional order, then our
    keyword-only extras. See the module docstring and PPOConfig."""

    progress_keys = {"reward": "objective/scores", "kl": "objective/kl"}
    supports_multi_process = True

    def __init__(
        self,
        args: PPOConfig,
        processing_class=None,
        model=None,
        ref_model=None,
        reward_model=None,
        train_dataset=None,
        value_model=None,
        data_collator=None,
        eval_dataset=None,
        optimizers=(None, None),
        callbacks=None,
        peft_config=None,
        *,
        reward_funcs=None,
        reward_processing_class=None,
    ):
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args: expected a PPOConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("model: required (a causal LM or a local path)")
        check_data_collator(data_collator)
        tokenizer = load_tokenizer(processing_class, model)
        require_pad_token(tokenizer)
        super().__init__(args, tokenizer, callbacks)

        # Policy and the frozen reference: the ref_model given, else the policy with its LoRA adapter disabled
        # (no second copy), else a frozen copy of the policy as given.
        policy = load_model(model, "causal_lm", args)
        with_adapter = peft_config is not None or is_peft_model(policy)
        if ref_model is not None:
            ref = load_model(ref_model, "causal_lm", args, "ref_model")
        else:
            ref = None if with_adapter else copy.deepcopy(policy)
        if ref is policy:
            raise ValueError("ref_model: must not be the policy object itself (pass None for a frozen copy)")
        self.ref_model = self.prepare_model(ref, trainable=False) if ref is not None else None

        # Rewards: [reward_model, *reward_funcs] with reward_weights; models are frozen.
        reward_model_obj = None
        if reward_model is not None:
            if reward_processing_class is None and isinstance(reward_model, str):
                reward_processing_class = load_tokenizer(None, reward_model, "reward_processing_class")
            reward_model_obj = load_model(reward_model, "sequence_classification", args, "reward_model", num_labels=1)
        self.reward_model = reward_model_obj
        self.reward_sources = self.build_reward_sources(reward_model_obj, reward_funcs, reward_processing_class)

        # Critic: a value head on the policy, the value_model given, a copy of the reward model (as
        # InstructGPT initialises it), or the policy's backbone with a fresh head.
        # With LoRA only the policy gets the adapter; the critic is trained in full (or is the value head).
        if args.shared_critic:
            if value_model is not None:
                raise ValueError(
                    "value_model: must be None with shared_critic=True (the value head lives on the policy)"
                )
            self.critic = ValueHead(policy.config.get_text_config().hidden_size).to(self.device)
        else:
            if value_model is not None:
                critic = load_model(value_model, "sequence_classification", args, "value_model", num_labels=1)
            elif reward_model_obj is not None:
                critic = copy.deepcopy(reward_model_obj)
            else:
                critic = critic_from_causal_lm(
                    copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) else policy
                )
            self.critic = self.prepare_model(critic.requires_grad_(True), trainable=True)
        self.policy = self.prepare_model(self.apply_peft(policy, peft_config), trainable=True)

        self.load_datasets(train_dataset, eval_dataset, self.tokenize_prompt_dataset)
        if args.total_episodes is None:  # as TRL does, so that args.num_total_batches is known from here on
            args.total_episodes = int(args.num_train_epochs * len(self.train_dataset))
        self.model = PolicyAndValue(self.policy, self.critic, args.shared_critic)
        self._state_before_training = TrainerState(
            is_world_process_zero=self.dist.is_main, is_local_process_zero=args.local_process_index == 0
        )
        self.kl_coef = args.kl_coef
        self._optimizers = optimizers
        self.shuffle_generator = torch.Generator().manual_seed(args.seed + 1)
        self.dist.broadcast_parameters([self.policy, self.critic, self.ref_model])  # the reference too: it must match
        self.shard_models(
            {
                "model": self.policy,
                "ref_model": self.ref_model,
                "value_model": None if args.shared_critic else self.critic,
            },
            optimizers,
        )

    # ---- what TRL's PPOTrainer (a transformers.Trainer) offers scripts and callbacks ----
    @property
    def policy_model(self):
        """The policy being trained (a PeftModel with LoRA)."""
        return self.policy

    @property
    def value_model(self):
        """The critic: a sequence classifier, or with shared_critic the value head on the policy."""
        return self.critic

    @property
    def state(self) -> TrainerState:
        """The run's transformers.TrainerState (global_step, log_history, ...), also before train()."""
        return self.reporter.state if self.reporter is not None else self._state_before_training

    def add_callback(self, callback):
        """Add a TrainerCallback (an instance or a class); it receives the events from the next one on."""
        self.callbacks.append(callback)
        if self.reporter is not None:
            self.reporter.callbacks.append(callback() if isinstance(callback, type) else callback)

    def log(self, logs: dict, start_time: Optional[float] = None):
        """Record `logs` at the current step: log_history, metrics.jsonl, TensorBoard and on_log once training
        has begun; before train() only state.log_history (train() keeps it)."""
        if self.reporter is None:
            self._state_before_training.log_history.append({**{k: float(v) for k, v in logs.items()}, "step": 0})
        else:
            self.reporter.log(logs)

    def is_world_process_zero(self) -> bool:
        return self.dist.is_main

    def is_local_process_zero(self) -> bool:
        return self.args.local_process_index == 0

    # ---- state that checkpoints carry ----
    def models_to_save(self) -> dict:
        return {"": self.policy, "critic": self.critic}

    def rng_generators(self) -> dict:
        # Sampling is keyed by (seed, step, row) (RolloutMixin.sample), so only the minibatch shuffle has a stream.
        return {"shuffle": self.shuffle_generator}

    def trainer_extra_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_trainer_extra_state(self, state: dict):
        self.kl_coef = state["kl_coef"]

    # ---- forward passes ----
    def policy_forward(self, ids, attn, P, return_entropy=False):
        """(logprobs [B, R], entropy [B, R] or None, values [B, R]) for the responses ids[:, P:]."""
        args = self.args
        with self.autocast():
            if args.shared_critic:
                return self.run(
                    self.policy,
                    logprobs_and_values,
                    self.critic,
                    ids,
                    attn,
                    P,
                    args.temperature,
                    return_entropy,
                    args.logprobs_chunk_size,
                )
            out = self.run(
                self.policy,
                sequence_logprobs,
                ids,
                attn,
                P,
                temperature=args.temperature,
                return_entropy=return_entropy,
                fused_linear=args.fused_linear_logprobs,
                chunk_size=args.logprobs_chunk_size,
            )
            logprobs, entropy = out if return_entropy else (out, None)
            return logprobs, entropy, self.run(self.critic, token_values, ids, attn, P)

    @torch.no_grad()
    def make_experience(self, rows: dict, step: int = 0, row_offset: int = 0) -> SimpleNamespace:
        """Rollout, scoring, per-token rewards, advantages and returns for one batch of prompts (this
        process's share of step `step`'s batch, starting at global row `row_offset`; they key the sampling)."""
        args = self.args
        rollout, prompt_mask, attn, time_rollout = self.roll_out(
            rows, step=step, row_offset=row_offset, chunk_size=args.local_rollout_forward_batch_size
        )
        timer = time.perf_counter()
        P, ids = rollout.prompt_length, rollout.sequences  # (B, P + R)
        mask = rollout.response_mask.float()  # (B, R): 1 up to and including EOS
        chunks = self.forward_chunks(ids.shape[0])
        old_logprobs, values = map(torch.cat, zip(*[self.policy_forward(ids[c], attn[c], P)[::2] for c in chunks]))
        ref_logprobs = torch.cat([self.reference_logprobs(ids[c], attn[c], P) for c in chunks])
        old_logprobs, ref_logprobs, values = old_logprobs * mask, ref_logprobs * mask, values * mask
        scores, per_source = self.score_rollout(rows, rollout, prompt_mask, attn)
        time_scoring = time.perf_counter() - timer

        # Per-token rewards: the KL leash on every real token, the score on the last real token (EOS, or
        # the last token of a truncated completion; never a pad position).
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~rollout.finished).float()
        raw_scores = scores
        if args.normalize_rewards:  # over the scores of every process
            everyone = self.dist.all_gather(scores)
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-8)
        if args.reward_clip is not None:
            scores = scores.clamp(-args.reward_clip, args.reward_clip)
        kl = kl_penalty(old_logprobs, ref_logprobs, args.kl_estimator) * mask  # (B, R)
        non_score_reward = -self.kl_coef * kl
        rewards = assemble_rewards(non_score_reward, scores, mask)
        if args.whiten_rewards:
            rewards = global_masked_whiten(rewards, mask, self.dist, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, gamma=args.gamma, lam=args.lam)
        advantages = global_masked_whiten(advantages, mask, self.dist)
        return SimpleNamespace(
            ids=ids,
            attn=attn,
            P=P,
            mask=mask,
            old_logprobs=old_logprobs,
            values=values,
            advantages=advantages,
            returns=returns,
            rewards=rewards,
            kl=kl,
            non_score_reward=non_score_reward,
            scores=raw_scores,
            per_source=per_source,
            finished=rollout.finished,
            time_rollout=time_rollout,
            time_scoring=time_scoring,
        )

    def ppo_update(self, exp: SimpleNamespace) -> dict:
        """num_ppo_epochs x num_mini_batches optimiser steps on one batch of experience."""
        args = self.args
        params = [p for m in (self.policy, self.critic) for p in m.parameters() if p.requires_grad]
        self.policy.train()
        self.critic.train()
        stats = {
            k: []
            for k in ("approxkl", "clipfrac", "policy", "value", "value_clipfrac", "entropy", "ratio", "grad_norm")
        }
        # TRL's layout: B = local_batch_size rows in num_mini_batches minibatches (one optimizer step each) of
        # local_mini_batch_size rows, each as micro-batches of per_device_train_batch_size rows (the last may be short)
        B, mini = exp.ids.shape[0], args.local_mini_batch_size
        micro = min(args.per_device_train_batch_size, mini)
        lengths = exp.mask.sum(1).long().cpu()  # (B,) on the host, so trimming needs no device sync
        stop = False
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle_generator)
            for mb_start in range(0, B, mini):
                minibatch_kl = []
                for micro_start in range(mb_start, mb_start + mini, micro):
                    rows = order[micro_start : min(micro_start + micro, mb_start + mini)]
                    R = int(lengths[rows].max())  # drop response columns that are padding in every row
                    idx = rows.to(self.device)
                    ids, attn = exp.ids[idx, : exp.P + R], exp.attn[idx, : exp.P + R]
                    logprobs, entropy, values = self.policy_forward(ids, attn, exp.P, return_entropy=True)
                    out = ppo_loss(
                        logprobs,
                        exp.old_logprobs[idx, :R],
                        exp.advantages[idx, :R],
                        exp.mask[idx, :R],
                        values=values,
                        old_values=exp.values[idx, :R],
                        returns=exp.returns[idx, :R],
                        entropy=entropy,
                        cliprange=args.cliprange,
                        cliprange_value=args.cliprange_value,
                        vf_coef=args.vf_coef,
                        entropy_coef=args.entropy_coef,
                    )
                    (out.loss / (mini / len(rows))).backward()  # the minibatch's loss: micro-batches weighted by rows
                    # statistics stay on the device until the end of the update (no host sync per micro-batch)
                    for key, value in (
                        ("approxkl", out.stats["approxkl"]),
                        ("clipfrac", out.stats["clipfrac"]),
                        ("policy", out.policy_loss),
                        ("value", out.value_loss),
                        ("entropy", out.entropy),
                        ("value_clipfrac", out.stats["value_clipfrac"]),
                        ("ratio", out.stats["ratio_mean"]),
                    ):
                        stats[key].append(value.detach().float())
                    minibatch_kl.append(stats["approxkl"][-1])
                stats["grad_norm"].append(self.clip_and_step(params).float())
                if (
                    args.early_stop_kl is not None
                    and self.dist.mean({"kl": float(torch.stack(minibatch_kl).mean())})["kl"] > args.early_stop_kl
                ):
                    stop = True
                    break
            if stop:
                break
        mean = self.dist.mean({k: float(torch.stack(v).mean()) for k, v in stats.items()})
        return {
            "policy/approxkl_avg": mean["approxkl"],
            "policy/clipfrac_avg": mean["clipfrac"],
            "policy/entropy_avg": mean["entropy"],
            "loss/policy_avg": mean["policy"],
            "loss/value_avg": mean["value"],
            "val/clipfrac_avg": mean["value_clipfrac"],
            "val/ratio": mean["ratio"],
            "grad_norm": mean["grad_norm"],
            "policy/early_stopped": float(stop),
        }

    def train(self, resume_from_checkpoint=None):
        args = self.args
        batches = StepBatches(
            len(self.train_dataset), args.batch_size, args.seed if args.data_seed is None else args.data_seed
        )
        total_steps = args.max_steps if args.max_steps > 0 else args.num_total_batches
        self.create_optimizer_and_scheduler([self.policy, self.critic], total_steps, self._optimizers)
        start = self.begin_training(
            total_steps,
            batches.batches_per_epoch,
            args.batch_size,
            resume_from_checkpoint or args.resume_from_checkpoint,
            self.policy,
        )
        if start == 0:  # what log() recorded before train() stays in the history
            self.state.log_history[:0] = self._state_before_training.log_history
        sample_every = max(1, total_steps // args.num_sample_generations) if args.num_sample_generations else 0
        for step in range(start, total_steps):
            self.reporter.step_begin()
            share = slice(self.dist.rank * args.local_batch_size, (self.dist.rank + 1) * args.local_batch_size)
            exp = self.make_experience(self.train_dataset[batches.indices(step)[share]], step, share.start)
            timer = time.perf_counter()
            update = self.ppo_update(exp)
            time_update = time.perf_counter() - timer
            lr = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()

            metrics = self.rollout_metrics(exp)
            metrics.update(
                {
                    "time/rollout": exp.time_rollout,
                    "time/scoring": exp.time_scoring,
                    "time/update": time_update,
                    "tokens_per_second": float(exp.mask.sum()) / (exp.time_rollout + exp.time_scoring + time_update),
                }
            )
            metrics = self.dist.mean(metrics)  # every process's means, averaged (equal batch sizes)
            metrics["val/num_eos_tokens"] *= self.dist.world_size  # counts and rates add up over processes
            metrics["tokens_per_second"] *= self.dist.world_size
            mean_kl = metrics["objective/kl"]
            metrics.update(update)
            metrics.update({"lr": lr, "episode": (step + 1) * args.batch_size, "objective/kl_coef": self.kl_coef})
            if args.target_kl is not None:  # adaptive KL controller (Ziegler et al. 2019)
                error = max(-0.2, min(0.2, mean_kl / args.target_kl - 1.0))
                self.kl_coef *= 1.0 + error * args.batch_size / args.kl_horizon
            if sample_every and self.eval_dataset is not None and (step + 1) % sample_every == 0:
                self.write_samples(step + 1)
            if self.end_step(metrics):
                break
        self.end_training()
        return self.reporter.state

    def rollout_metrics(self, exp: SimpleNamespace) -> dict:
        mean_kl = float(exp.kl.sum(1).mean())
        non_score = float(exp.non_score_reward.sum(1).mean())
        scores = float(exp.scores.mean())
        metrics = {
            "objective/kl": mean_kl,
            "objective/entropy": float((-exp.old_logprobs * exp.mask).sum(1).mean()),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores + non_score,
            "objective/scores": scores,
            "val/num_eos_tokens": float(exp.finished.sum()),
            "val/vf_explained_var": explained_variance(exp.values, exp.returns, exp.mask),
            "completions/mean_length": float(exp.mask.sum(1).mean()),
        }
        if len(self.reward_sources) > 1:
            for i, name in enumerate(self.reward_sources.names):
                metrics[f"rewards/{name}/mean"] = float(torch.nanmean(exp.per_source[:, i]))
        return metrics


def check_data_collator(data_collator):
    """TRL's default collator (DataCollatorWithPadding) pads prompts, as PPOTrainer does itself; refuse others."""
    from transformers import DataCollatorWithPadding

    if data_collator is None:
        return
    plain = (
        isinstance(data_collator, DataCollatorWithPadding)
        and data_collator.padding in (True, "longest")
        and data_collator.max_length is None
        and data_collator.pad_to_multiple_of is None
    )
    if not plain:
        raise ValueError(
            f"data_collator: only None or a default transformers.DataCollatorWithPadding is supported "
            f"(PPOTrainer left-pads the prompts itself), got {data_collator!r}"
        )


class PolicyAndValue(nn.Module):
    """`trainer.model`, as in TRL: the policy and the critic in one module (parameters, state_dict, train/eval).
    `forward(input_ids, attention_mask)` returns (the policy's output, values [B, L] at every position)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module, shared_critic: bool):
        super().__init__()
        self.policy, self.value_model, self.shared_critic = policy, value_model, shared_critic
        self.config = policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        kwargs.setdefault("position_ids", position_ids_from_mask(attention_mask))  # left padding needs them
        output = self.policy(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.shared_critic:  # the value head reads the policy's last hidden states
            return output, self.value_model(hidden_states(self.policy, input_ids, attention_mask))
        hidden = hidden_states(self.value_model, input_ids, attention_mask)  # (B, L, H)
        return output, score_head(self.value_model)(hidden)[..., 0].float()


def assemble_rewards(non_score_reward: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, R]` per-token rewards: non_score_reward everywhere, plus `scores[b]` on row b's last real token."""
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.device, rewards.dtype)
    return rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens (1: perfect critic, <= 0: useless)."""
    var_returns = float(masked_var(returns, mask, unbiased=False))
    residual = returns - values
    var_residual = float(masked_var(residual, mask, unbiased=False))
    return float("nan") if var_returns == 0 else 1.0 - var_residual / var_returns
