"""The critic-free policy-gradient trainer behind GRPOTrainer and RLOOTrainer (rlhf_ext.trainers.grpo / .rloo, which
give it their config class): one loop, four advantage estimators (GRPO, RLOO, REINFORCE++ with and without a baseline).

One optimizer step, top to bottom (`train` -> `generate_and_score` -> `critic_free_advantages` -> `update`):
  at the start of each generation round (every steps_per_generation * num_iterations micro-batches):
    this process's share of the round's prompts, each repeated num_generations times -> `sample_completions`
    -> old log-probs (only when the policy moves between sampling and use: the sampler's, or recomputed with
       recompute_old_logprobs) and reference log-probs
       (only when beta > 0; with LoRA the reference is the policy with its adapter disabled)
    -> reward functions / reward models -> rewards of every process all-gathered
    -> advantages (below), of which this process keeps its own rows
  then gradient_accumulation_steps micro-batches: log-probs + entropy (`policy_logprobs`) -> `ppo_loss`
  (clipped ratio; for GRPO the k3 KL to the reference times beta; aggregated per loss_type) -> backward,
  weighted so the step's loss is the loss_type's average over all its micro-batches and processes
  -> gradients averaged over processes, clipped -> optimizer and scheduler step.

`advantage_estimator` (one trainer, four estimators; RLOOTrainer is this trainer with RLOOConfig's "rloo" defaults):
  grpo                   A = (r - mean of its group) / std (scale_rewards); KL (k3, beta) in the loss.
  rloo                   r' = r - beta * sum_t KL_t; A = r' - mean of the other r' of its group (optionally
                         whitened over the batch: normalize_advantages). No KL term in the loss.
  reinforce_pp           per-token reward -beta * KL_t plus r on the last real token; A_t = reward-to-go,
                         whitened over every real token of the global batch. No KL term in the loss.
  reinforce_pp_baseline  the same with r - mean of its group in place of r (REINFORCE++-baseline).
"""

import copy
import os
import time
from dataclasses import dataclass

import torch

from rlhf_ext.ops import kl_penalty, ppo_loss
from rlhf_ext.trainers.advantages import critic_free_advantages
from rlhf_ext.trainers.base import BaseTrainer
from rlhf_ext.trainers.data import StepBatches
from rlhf_ext.trainers.distributed import zero_fields
from rlhf_ext.trainers.episodes import EnvironmentRunner, group_episode_experience
from rlhf_ext.trainers.evaluation import group_eval_metrics, group_eval_sums, trainer_completions
from rlhf_ext.trainers.experience import (
    Experience,
    by_chunks,
    policy_logprobs,
    reference_logprobs,
)
from rlhf_ext.trainers.grpo_config import GRPOConfig
from rlhf_ext.trainers.loading import load_model, load_padding_tokenizer
from rlhf_ext.trainers.lora import is_peft_model
from rlhf_ext.trainers.reward_sources import build_reward_sources, decode_completions
from rlhf_ext.trainers.rollout_metrics import group_rollout_metrics


@dataclass
class StepSums:
    """What one optimizer step adds up over its micro-batches (0-dim float64 tensors), then over processes."""

    loss: torch.Tensor  # the step's loss: each micro-batch's weighted share, divided by the processes
    tokens: torch.Tensor  # trained tokens
    entropy: torch.Tensor  # entropy summed over the trained tokens
    kl: torch.Tensor  # k3 KL to the reference summed over the trained tokens
    clip_low: torch.Tensor  # trained tokens whose ratio was clipped below 1 - epsilon
    clip_high: torch.Tensor  # ... above 1 + epsilon_high
    clip_region: torch.Tensor  # clip_low + clip_high


class CriticFreeTrainer(BaseTrainer):
    """`<Trainer>(model, reward_funcs, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
    reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None, *, env_factory=None,
    environment_factory=None, tools=None)`.

    model: a causal LM or a local path. reward_funcs: a callable `f(prompts, completions, **columns) ->
    list[float | None]`, a sequence-classification reward model (object or local path), or a list mixing them.
    Subclasses set `config_class` (GRPOConfig, RLOOConfig). env_factory (gym form) or TRL's environment_factory /
    tools (tool form): each completion is a multi-turn episode (rlhf_ext.trainers.episodes; a group is
    num_generations episodes from one reset seed and row); the dataset and reward_funcs are then optional.
    """

    config_class = GRPOConfig
    metric_keys = tuple(
        "reward reward_std frac_reward_zero_std rewards/*/mean rewards/*/std completions/mean_length "
        "completions/min_length completions/max_length completions/clipped_ratio "
        "completions/mean_terminated_length completions/min_terminated_length "
        "completions/max_terminated_length time/rollout time/scoring time/update loss grad_norm entropy kl "
        "clip_ratio/low_mean clip_ratio/high_mean clip_ratio/region_mean clip_ratio/low_min "
        "clip_ratio/high_max learning_rate episodes/* ".split()
    )
    progress_keys = {"reward": "reward", "kl": "kl"}
    supports_multi_process = True

    def __init__(
        self,
        model,
        reward_funcs=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        *,
        env_factory=None,
        environment_factory=None,
        tools=None,
    ):
        if model is None:
            raise ValueError("model: required (a causal LM or a local path)")
        if args is None:
            name = (
                model
                if isinstance(model, (str, os.PathLike))
                else getattr(model.config, "_name_or_path", "") or "model"
            )
            args = self.config_class(
                output_dir=f"{os.path.basename(str(name).rstrip('/'))}-{self.config_class.__name__[:-6]}"
            )
        if not isinstance(args, self.config_class):
            raise TypeError(f"args: expected a {self.config_class.__name__}, got {type(args).__name__}")
        with_env = env_factory is not None or environment_factory is not None or bool(tools)
        if not with_env and (reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs)):
            raise ValueError("reward_funcs: required (reward functions, reward models, or a list of them)")
        tokenizer = load_padding_tokenizer(processing_class, model)
        self.env = EnvironmentRunner.build(env_factory, environment_factory, tools, args, tokenizer)
        super().__init__(args, tokenizer, callbacks)

        # The policy; the reference is a frozen copy only when beta > 0 and there is no adapter to disable.
        policy = self.apply_peft(load_model(model, "causal_lm", args), peft_config)
        ref = copy.deepcopy(policy) if args.beta > 0 and not is_peft_model(policy) else None
        self.policy = self.prepare_model(policy, trainable=True)
        self.ref_model = self.prepare_model(ref, trainable=False) if ref is not None else None
        self.reward_sources = build_reward_sources(
            None,
            reward_funcs,
            args,
            tokenizer,
            lambda source: self.prepare_model(source, trainable=False),
            reward_processing_classes=reward_processing_classes,
            allow_none=True,
            optional=self.env is not None,
        )
        prompts_per_round = args.generation_batch_size // args.num_generations
        self.load_datasets(
            *EnvironmentRunner.datasets(self.env, train_dataset, eval_dataset, prompts_per_round, args, tokenizer),
            expected="a 'prompt' column, text or chat messages",
        )
        self.sampling = args.sampling_settings(tokenizer)
        self._optimizers = optimizers
        self.buffer, self.buffer_round = None, None
        self.last_completions = []
        self.dist.broadcast_parameters([self.policy, self.ref_model])  # the reference too: it must match
        self.shard_models({"model": self.policy, "ref_model": self.ref_model}, optimizers)

    # ---- batch layout ----
    @property
    def rows_per_process(self) -> int:
        """Completions each process holds per generation round."""
        return self.args.per_device_train_batch_size * self.args.steps_per_generation

    @property
    def windows_per_round(self) -> int:
        return self.args.steps_per_generation // self.args.gradient_accumulation_steps

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per generation round (> 1: the policy moves before the samples are used up)."""
        return self.windows_per_round * self.args.num_iterations

    def round_rows(self, batches: StepBatches, round_index: int):
        """This process's rows of the round (each prompt repeated num_generations times) and its first global row."""
        G, L = self.args.num_generations, self.rows_per_process
        expanded = [i for i in batches.indices(round_index) for _ in range(G)]
        offset = self.dist.rank * L
        return self.train_dataset[expanded[offset : offset + L]], offset

    # ---- checkpoints ----
    def models_to_save(self) -> dict:
        return {"": self.policy}

    def checkpoint_payload(self) -> dict:
        # Mid-round, the samples (drawn by an earlier policy) are part of the state: keep every process's share.
        if self.reporter.state.global_step % self.steps_per_round == 0 or self.buffer is None:
            return {}
        share = vars(self.buffer.to("cpu"))
        return {"rollout_buffer.pt": {"round": self.buffer_round, "processes": self.dist.gather_objects(share)}}

    def load_checkpoint_payload(self, path: str):
        file = os.path.join(path, "rollout_buffer.pt")
        if not os.path.exists(file):
            return
        saved = torch.load(file, weights_only=False)
        if len(saved["processes"]) != self.dist.world_size:
            raise ValueError(
                f"resume_from_checkpoint: {path} was saved mid generation round by {len(saved['processes'])} "
                f"processes; resume it with that many (now {self.dist.world_size})"
            )
        self.buffer = Experience(**saved["processes"][self.dist.rank]).to(self.device)
        self.buffer_round = saved["round"]

    # ---- one generation round ----
    @torch.no_grad()
    def generate_and_score(self, rows: dict, round_index: int, row_offset: int):
        """Sample, score and compute advantages for this process's rows; returns (experience, metrics)."""
        if self.env is not None:
            return group_episode_experience(self, rows, round_index, row_offset)
        args, dist = self.args, self.dist
        rollout, time_rollout = self.sample(rows, round_index, row_offset, args.generation_chunk_size)
        timer = time.perf_counter()
        sequences, attention_mask, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length  # (B, P + R)
        response_mask = rollout.response_mask.float()  # (B, R): 1 up to and including EOS
        size = args.local_rollout_forward_batch_size
        kl_in_reward = args.advantage_estimator != "grpo" and args.beta > 0
        old_logprobs = ref_logprobs = None
        if self.steps_per_round > 1 or kl_in_reward:  # the policy moves before these samples are used up
            if args.old_logprobs_from_sampler:
                old_logprobs = rollout.logprobs * response_mask
            else:
                old_logprobs = by_chunks(
                    lambda *chunk: policy_logprobs(self.policy, *chunk, args, run=self.run), rollout, size
                )
        if args.beta > 0:
            ref_logprobs = by_chunks(
                lambda *chunk: reference_logprobs(self.policy, self.ref_model, *chunk, args, run=self.run),
                rollout,
                size,
            )
        scores, per_source = self.reward_sources.score(rows, rollout)  # (B,), (B, S)
        all_scores = dist.all_gather(scores.float())  # (N,) every process's rewards, in global row order
        advantages = critic_free_advantages(
            args, scores, all_scores, response_mask, old_logprobs, ref_logprobs, row_offset, dist
        )
        loss_mask = response_mask * rollout.finished[:, None] if args.mask_truncated_completions else response_mask
        metrics = group_rollout_metrics(
            all_scores,
            dist.all_gather(per_source.to(self.device)),
            dist.all_gather(response_mask.sum(1)),
            dist.all_gather(rollout.finished.long()).bool(),
            args.num_generations,
            self.reward_sources.names,
        )
        metrics.update({"time/rollout": time_rollout, "time/scoring": time.perf_counter() - timer})
        if args.log_completions:
            prompts, completions, _ = decode_completions(self.processing_class, rows, rollout)
            mine = [
                {"prompt": p, "completion": c, "reward": float(r)}
                for p, c, r in zip(prompts, completions, scores.tolist())
            ]
            self.last_completions = [row for part in dist.gather_objects(mine) for row in part]
        experience = Experience(
            sequences=sequences,
            attention_mask=attention_mask,
            prompt_length=P,
            response_mask=response_mask,
            loss_mask=loss_mask,
            advantages=advantages,
            scores=scores,
            per_source=per_source,
            finished=rollout.finished,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            time_rollout=time_rollout,
            time_scoring=metrics["time/scoring"],
        )
        return experience, metrics

    # ---- one optimizer step ----
    def update(self, exp: Experience, window: int) -> dict:
        """gradient_accumulation_steps micro-batches of the experience (window `window`), then one optimizer step."""
        args, dist = self.args, self.dist
        micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
        parts = [slice((window * accum + j) * micro, (window * accum + j + 1) * micro) for j in range(accum)]
        if args.loss_type == "dapo":  # token mean over the whole step: count every process's tokens first
            step_tokens = dist.sum(sum(exp.loss_mask[p].sum() for p in parts)).clamp(min=1)
        step_rows = micro * accum * dist.world_size
        use_kl_loss = args.advantage_estimator == "grpo" and args.beta > 0
        self.policy.train()
        sums = zero_fields(StepSums, self.device)
        lengths, P = exp.response_lengths, exp.prompt_length
        for part in parts:
            R = int(lengths[part].max())  # response columns that are padding in every row are dropped
            sequences, attention_mask = exp.sequences[part, : P + R], exp.attention_mask[part, : P + R]
            mask = exp.loss_mask[part, :R]
            logprobs, entropy = policy_logprobs(
                self.policy, sequences, attention_mask, P, args, return_entropy=True, run=self.run
            )
            old = exp.old_logprobs[part, :R] if exp.old_logprobs is not None else logprobs.detach()
            ref = exp.ref_logprobs[part, :R] if exp.ref_logprobs is not None else None
            out = ppo_loss(
                logprobs,
                old,
                exp.advantages[part, :R],
                mask,
                ref_logprobs=ref if use_kl_loss else None,
                cliprange=args.epsilon,
                cliprange_high=args.epsilon_high,
                kl_coef=args.beta if use_kl_loss else 0.0,
                kl_estimator="k3",
                loss_agg=args.loss_agg,
                loss_agg_norm=float(args.max_completion_length) if args.loss_type == "dr_grpo" else None,
            )
            tokens = mask.sum()
            if args.loss_type == "dapo":
                weight = tokens * dist.world_size / step_tokens
            elif args.loss_type == "bnpo":
                weight = 1.0 / accum
            else:  # mean over every sequence of the step, empty (masked) ones counting as 0 as in TRL
                weight = (mask.sum(1) > 0).sum() * dist.world_size / step_rows
            (out.loss * weight).backward()
            with torch.no_grad():
                kl = (
                    (kl_penalty(logprobs.detach(), ref, "k3") * mask).sum() if ref is not None else tokens.new_zeros(())
                )
                low, high = out.stats["clipfrac_low"] * tokens, out.stats["clipfrac_high"] * tokens
                sums.loss += (out.loss.detach() * weight / dist.world_size).double()
                sums.tokens += tokens.double()
                sums.entropy += (entropy.detach() * mask).sum().double()
                sums.kl += kl.double()
                sums.clip_low += low.double()
                sums.clip_high += high.double()
                sums.clip_region += (low + high).double()
        grad_norm = self.clip_and_step([p for p in self.policy.parameters() if p.requires_grad])
        # each process's clip means (B-gathered as [low, high] pairs): the min / max over processes are logged too
        clip_means = dist.all_gather((torch.stack([sums.clip_low, sums.clip_high]) / sums.tokens.clamp(min=1)).float())
        total = dist.sum_fields(sums)
        n = max(total.tokens, 1.0)
        metrics = {
            "loss": total.loss,
            "grad_norm": float(grad_norm),
            "entropy": total.entropy / n,
            "clip_ratio/low_mean": total.clip_low / n,
            "clip_ratio/high_mean": total.clip_high / n,
            "clip_ratio/region_mean": total.clip_region / n,
            "clip_ratio/low_min": float(clip_means[0::2].min()),
            "clip_ratio/high_max": float(clip_means[1::2].max()),
        }
        if exp.ref_logprobs is not None:
            metrics["kl"] = total.kl / n
        return metrics

    def train(self, resume_from_checkpoint=None):
        args = self.args
        prompts_per_round = args.generation_batch_size // args.num_generations
        batches = StepBatches(
            len(self.train_dataset),
            prompts_per_round,
            args.seed if args.data_seed is None else args.data_seed,
            shuffle=args.shuffle_dataset,
        )
        rounds = batches.total_steps(args.num_train_epochs, 0)
        total_steps = args.max_steps if args.max_steps > 0 else rounds * self.steps_per_round
        self.create_optimizer_and_scheduler([self.policy], total_steps, self._optimizers)
        start = self.begin_training(
            total_steps,
            batches.batches_per_epoch * self.steps_per_round,
            args.generation_batch_size,
            resume_from_checkpoint or args.resume_from_checkpoint,
            self.policy,
        )
        for step in range(start, total_steps):
            self.reporter.step_begin()
            round_index, in_round = divmod(step, self.steps_per_round)
            metrics = {}
            if self.buffer_round != round_index:  # a run resumed mid-round has the round's buffer already
                rows, offset = self.round_rows(batches, round_index)
                self.buffer, metrics = self.generate_and_score(rows, round_index, offset)
                self.buffer_round = round_index
            timer = time.perf_counter()
            metrics.update(self.update(self.buffer, in_round % self.windows_per_round))
            metrics["time/update"] = time.perf_counter() - timer
            metrics["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()
            if args.log_completions and self.last_completions:
                self.write_completions(step + 1)
            if self.end_step(metrics):
                break
        self.end_training()
        return self.reporter.state

    def write_completions(self, step: int):
        """Print (num_completions_to_print of) the last round's completions and append them to completions.jsonl."""
        rows, self.last_completions = self.last_completions, []
        if not self.dist.is_main:
            return
        self.reporter.write_rows("completions.jsonl", step, rows)
        for row in rows[: self.args.num_completions_to_print]:
            print(f"[step {step}] reward {row['reward']:+.3f} | {row['prompt']!r} -> {row['completion']!r}")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval_reward, eval_reward_std and eval_completions/* over num_generations samples of every eval prompt."""
        with self.gathered(self.policy):  # FSDP: no collective inside, as ranks may sample different chunk counts
            sums = group_eval_sums(
                self.policy, self.reward_sources, self.eval_dataset, self.sampling, self.args, self.dist
            )
        self.policy.train()
        return group_eval_metrics(self.dist.sum_fields(sums))

    def generate_completions(self, dataset=None, max_rows=None, greedy: bool = False, seed=None) -> list:
        """Scored completions of a tokenized prompt dataset (default: eval_dataset); see `completion_records`."""
        return trainer_completions(self, dataset, max_rows, greedy, seed)
