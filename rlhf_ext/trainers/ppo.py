"""PPO with a critic (InstructGPT / TRL's PPOTrainer), built on the fused ops.

One step, as read top to bottom in `train` / `make_experience` / `ppo_update` (the helpers they call are free
functions in experience.py, reward_sources.py and advantages.py):
  prompts -> `sample_completions` (the KV-cached completion path, keyed by seed, step and row)
  -> old log-probs (the sampler's, or recomputed: recompute_old_logprobs), reference log-probs
     (`reference_logprobs`), values, scores (`RewardSources.score`)
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

import collections
import copy
import time

import torch

from rlhf_ext.models.heads import logprobs_and_values, policy_values, token_values
from rlhf_ext.ops import ppo_loss
from rlhf_ext.trainers.advantages import ppo_targets
from rlhf_ext.trainers.base import BaseTrainer
from rlhf_ext.trainers.data import StepBatches
from rlhf_ext.trainers.episodes import EnvironmentRunner, ppo_episode_experience
from rlhf_ext.trainers.evaluation import completion_metrics, trainer_completions
from rlhf_ext.trainers.experience import (
    Experience,
    by_chunks,
    has_reference,
    policy_logprobs,
    reference_logprobs,
)
from rlhf_ext.trainers.loading import load_critic, load_model, load_padding_tokenizer, load_tokenizer
from rlhf_ext.trainers.lora import is_peft_model
from rlhf_ext.trainers.ppo_config import PPOConfig
from rlhf_ext.trainers.reward_sources import build_reward_sources
from rlhf_ext.trainers.rollout_metrics import ppo_rollout_metrics
from rlhf_ext.trainers.trl_compat import PolicyAndValue, check_data_collator

__all__ = ["PPOConfig", "PPOTrainer"]


class PPOTrainer(BaseTrainer):
    """`PPOTrainer(args, processing_class, model, ref_model=None, reward_model=None, train_dataset=None,
    value_model=None, data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None,
    peft_config=None, *, reward_funcs=None, reward_processing_class=None, env_factory=None)`: TRL's positional
    order, then our keyword-only extras. See the module docstring and PPOConfig. With `env_factory` (a callable
    returning a fresh gym-style text environment) the policy plays multi-turn episodes (rlhf_ext.trainers.episodes);
    train_dataset is then optional (its rows go to reset's options) and so are the reward model and functions."""

    metric_keys = tuple(
        "objective/kl objective/entropy objective/non_score_reward objective/rlhf_reward objective/scores "
        "objective/kl_coef val/num_eos_tokens val/vf_explained_var completions/mean_length rewards/*/mean "
        "time/rollout time/scoring time/update tokens_per_second policy/approxkl_avg policy/clipfrac_avg "
        "policy/entropy_avg loss/policy_avg loss/value_avg val/clipfrac_avg val/ratio grad_norm "
        "policy/early_stopped learning_rate episode episodes/* ".split()
    )
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
        env_factory=None,
    ):
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args: expected a PPOConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("model: required (a causal LM or a local path)")
        check_data_collator(data_collator)
        tokenizer = load_padding_tokenizer(processing_class, model)
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
        self.env = EnvironmentRunner.build(env_factory, None, None, args, tokenizer)
        self.reward_sources = build_reward_sources(
            reward_model_obj,
            reward_funcs,
            args,
            tokenizer,
            lambda source: self.prepare_model(source, trainable=False),
            reward_processing_class=reward_processing_class,
            optional=self.env is not None,
        )

        # Critic: a value head on the policy (shared_critic), the value_model given, a copy of the reward model,
        # or the policy's backbone with a fresh head (see `load_critic`); built before the policy gets its adapter.
        self.critic = load_critic(
            args, policy, value_model, reward_model_obj, self.device, lambda m: self.prepare_model(m, trainable=True)
        )
        self.policy = self.prepare_model(self.apply_peft(policy, peft_config), trainable=True)

        self.load_datasets(
            *EnvironmentRunner.datasets(self.env, train_dataset, eval_dataset, args.batch_size, args, tokenizer)
        )
        self.sampling = args.sampling_settings(tokenizer)
        if args.total_episodes is None:  # as TRL does, so that args.num_total_batches is known from here on
            args.total_episodes = int(args.num_train_epochs * len(self.train_dataset))
        self.model = PolicyAndValue(self.policy, self.critic, args.shared_critic)
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

    # ---- state that checkpoints carry ----
    def models_to_save(self) -> dict:
        return {"": self.policy, "critic": self.critic}

    def rng_generators(self) -> dict:
        # Sampling is keyed by (seed, step, row) (experience.sampling_key): only the minibatch shuffle has a stream.
        return {"shuffle": self.shuffle_generator}

    def trainer_extra_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_trainer_extra_state(self, state: dict):
        self.kl_coef = state["kl_coef"]

    # ---- one step: experience, then the update ----
    def policy_forward(self, sequences, attention_mask, P, return_entropy=False):
        """(logprobs [B, R], entropy [B, R] or None, values [B, R]) for the responses sequences[:, P:]."""
        args = self.args
        if args.shared_critic:  # one forward: the value head reads the policy's last hidden states
            with self.autocast():
                return self.run(
                    self.policy,
                    logprobs_and_values,
                    self.critic,
                    sequences,
                    attention_mask,
                    P,
                    args.temperature,
                    return_entropy,
                    args.logprobs_chunk_size,
                )
        out = policy_logprobs(
            self.policy, sequences, attention_mask, P, args, return_entropy=return_entropy, run=self.run
        )
        logprobs, entropy = out if return_entropy else (out, None)
        return logprobs, entropy, self.critic_values(sequences, attention_mask, P)

    def critic_values(self, sequences, attention_mask, P):
        """(B, R) values of the responses sequences[:, P:] (with shared_critic: from the policy's forward)."""
        with self.autocast():
            if self.args.shared_critic:  # the value head on the policy's hidden states; no lm_head needed
                return self.run(self.policy, policy_values, self.critic, sequences, attention_mask, P)
            return self.run(self.critic, token_values, sequences, attention_mask, P)

    @torch.no_grad()
    def make_experience(self, rows: dict, step: int = 0, row_offset: int = 0) -> Experience:
        """Rollout, scoring, per-token rewards, advantages and returns for one batch of prompts (this
        process's share of step `step`'s batch, starting at global row `row_offset`; they key the sampling)."""
        if self.env is not None:
            return ppo_episode_experience(self, rows, step, row_offset)
        args = self.args
        size = args.local_rollout_forward_batch_size
        rollout, time_rollout = self.sample(rows, step, row_offset, size)
        timer = time.perf_counter()
        mask = rollout.response_mask.float()  # (B, R): 1 up to and including the stop token
        old_logprobs, ref_logprobs, values = self.scoring_passes(rollout)
        scores, per_source = self.reward_sources.score(rows, rollout)  # (B,) on the device, (B, S)
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
        return Experience(
            sequences=rollout.sequences,
            attention_mask=rollout.attention_mask,
            prompt_length=rollout.prompt_length,
            response_mask=mask,
            loss_mask=mask,
            scores=raw_scores,
            per_source=per_source,
            finished=rollout.finished,
            time_rollout=time_rollout,
            time_scoring=time_scoring,
            **ppo_targets(args, self.kl_coef, self.dist, old_logprobs, ref_logprobs, values, scores, mask),
        )

    def scoring_passes(self, rollout) -> tuple:
        """(old_logprobs, ref_logprobs, values), each (B, R), of a rollout's responses, 0 after each row's stop:
        the no-grad passes, `local_rollout_forward_batch_size` rows at a time (the old log-probs are the sampler's
        unless recompute_old_logprobs)."""
        args, size = self.args, self.args.local_rollout_forward_batch_size
        if args.old_logprobs_from_sampler:  # the policy has not moved since it sampled: no forward for them
            old_logprobs = rollout.logprobs * rollout.response_mask
            values = by_chunks(self.critic_values, rollout, size)
        else:
            old_logprobs, _, values = by_chunks(self.policy_forward, rollout, size)
        ref_logprobs = by_chunks(
            lambda *chunk: reference_logprobs(self.policy, self.ref_model, *chunk, args, run=self.run), rollout, size
        )
        return old_logprobs, ref_logprobs, values

    def ppo_update(self, exp: Experience) -> dict:
        """num_ppo_epochs x num_mini_batches optimiser steps on one batch of experience."""
        args = self.args
        params = [p for m in (self.policy, self.critic) for p in m.parameters() if p.requires_grad]
        self.policy.train()
        self.critic.train()
        # metric -> its value at each micro-batch (grad_norm: each minibatch), kept on the device until the end
        stats = collections.defaultdict(list)
        # TRL's layout: B = local_batch_size rows in num_mini_batches minibatches (one optimizer step each) of
        # local_mini_batch_size rows, each as micro-batches of per_device_train_batch_size rows (the last may be short)
        B, mini, P = exp.sequences.shape[0], args.local_mini_batch_size, exp.prompt_length
        micro = min(args.per_device_train_batch_size, mini)
        lengths = exp.response_lengths.cpu()  # (B,) on the host, so trimming needs no device sync
        stop = False
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle_generator)
            for mb_start in range(0, B, mini):
                minibatch_kl = []
                for micro_start in range(mb_start, mb_start + mini, micro):
                    rows = order[micro_start : min(micro_start + micro, mb_start + mini)]
                    R = int(lengths[rows].max())  # drop response columns that are padding in every row
                    idx = rows.to(self.device)
                    sequences, attention_mask = exp.sequences[idx, : P + R], exp.attention_mask[idx, : P + R]
                    logprobs, entropy, values = self.policy_forward(sequences, attention_mask, P, return_entropy=True)
                    out = ppo_loss(
                        logprobs,
                        exp.old_logprobs[idx, :R],
                        exp.advantages[idx, :R],
                        exp.loss_mask[idx, :R],
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
                    micro_stats = {
                        "policy/approxkl_avg": out.stats["approxkl"],
                        "policy/clipfrac_avg": out.stats["clipfrac"],
                        "policy/entropy_avg": out.entropy,
                        "loss/policy_avg": out.policy_loss,
                        "loss/value_avg": out.value_loss,
                        "val/clipfrac_avg": out.stats["value_clipfrac"],
                        "val/ratio": out.stats["ratio_mean"],
                    }
                    for key, value in micro_stats.items():
                        stats[key].append(value.detach().float())
                    minibatch_kl.append(stats["policy/approxkl_avg"][-1])
                stats["grad_norm"].append(self.clip_and_step(params).float())
                if (
                    args.early_stop_kl is not None
                    and self.dist.mean({"kl": float(torch.stack(minibatch_kl).mean())})["kl"] > args.early_stop_kl
                ):
                    stop = True
                    break
            if stop:
                break
        metrics = self.dist.mean({k: float(torch.stack(v).mean()) for k, v in stats.items()})
        metrics["policy/early_stopped"] = float(stop)
        return metrics

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
        sample_every = max(1, total_steps // args.num_sample_generations) if args.num_sample_generations else 0
        for step in range(start, total_steps):
            self.reporter.step_begin()
            share = slice(self.dist.rank * args.local_batch_size, (self.dist.rank + 1) * args.local_batch_size)
            exp = self.make_experience(self.train_dataset[batches.indices(step)[share]], step, share.start)
            timer = time.perf_counter()
            update = self.ppo_update(exp)
            time_update = time.perf_counter() - timer
            learning_rate = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()

            # kl_coef: before the controller; episodes/*: what the environment runner measured on the rollout
            metrics = ppo_rollout_metrics(exp, self.kl_coef, self.reward_sources or ())
            metrics.update(self.env.last_metrics if self.env is not None else {})
            metrics.update(
                {
                    "time/rollout": exp.time_rollout,
                    "time/scoring": exp.time_scoring,
                    "time/update": time_update,
                    "tokens_per_second": float(exp.response_mask.sum())
                    / (exp.time_rollout + exp.time_scoring + time_update),
                }
            )
            metrics = self.dist.mean(metrics)  # every process's means, averaged (equal batch sizes)
            metrics["val/num_eos_tokens"] *= self.dist.world_size  # counts and rates add up over processes
            metrics["tokens_per_second"] *= self.dist.world_size
            mean_kl = metrics["objective/kl"]
            metrics.update(update)
            metrics.update(
                {
                    "learning_rate": learning_rate,
                    "episode": (step + 1) * args.batch_size,
                    "objective/kl_coef": self.kl_coef,
                }
            )
            if args.target_kl is not None:  # adaptive KL controller (Ziegler et al. 2019)
                error = max(-0.2, min(0.2, mean_kl / args.target_kl - 1.0))
                self.kl_coef *= 1.0 + error * args.batch_size / args.kl_horizon
            if sample_every and self.eval_dataset is not None and (step + 1) % sample_every == 0:
                self.write_samples(step + 1)
            if self.end_step(metrics):
                break
        self.end_training()
        return self.reporter.state

    # ---- evaluation: scored completions of eval_dataset ----
    def generate_completions(self, dataset=None, max_rows=None, greedy: bool = False, seed=None) -> list:
        """Scored completions of a tokenized prompt dataset (default: eval_dataset); see `completion_records`."""
        return trainer_completions(self, dataset, max_rows, greedy, seed)

    def evaluate(self) -> dict:
        """Mean score, KL to the reference (when there is one) and EOS rate of sampled completions on eval_dataset."""
        return completion_metrics(self.generate_completions(), has_reference(self.policy, self.ref_model))

    def write_samples(self, step: int, max_rows: int = 8):
        """Append a few eval completions to <output_dir>/samples.jsonl (rank 0 writes; with FSDP every rank
        must call this, as the sharded weights are gathered for it)."""
        if self.dist.is_main or self.fsdp is not None:
            self.reporter.write_rows("samples.jsonl", step, self.generate_completions(max_rows=max_rows))
