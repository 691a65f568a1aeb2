"""Training on environments: PPO's and the critic-free trainers' experience built from multi-turn episodes
(`rlhf_ext.environments.rollout.run_episodes`) instead of single completions.

The layout is the one the trainers already feed their forwards: left-padded first observation, then the episode
packed (agent and environment tokens), then padding. Only agent tokens carry log-probs, KL, values, rewards and
the loss; environment tokens are context. PPO: each step's reward on the last agent token of its turn, the
reward sources' score (if any) on the last agent token, -kl_coef * KL on every agent token, GAE across turns over
agent tokens only (the masked GAE kernel carries the next value across environment tokens). Critic-free: the
episode return (plus the reward sources' score) is the completion's reward, group-normalised as usual. An
episode that ended on an environment error stays in the batch as context but out of the loss (its return is
unknown). Episodes are keyed like completions: reset seeds and sampling from (seed, step, row), GRPO's group of
num_generations episodes sharing one reset seed and dataset row.
"""

import time
from typing import Optional

import torch

from rlhf_ext.environments.rollout import EpisodeBatch, run_episodes
from rlhf_ext.generation import Rollout
from rlhf_ext.trainers.advantages import critic_free_advantages, ppo_targets
from rlhf_ext.trainers.data import tokenize_prompts
from rlhf_ext.trainers.experience import Experience, by_chunks, policy_logprobs, reference_logprobs, sampling_key
from rlhf_ext.trainers.rollout_metrics import group_rollout_metrics

PLACEHOLDER_COLUMN = "episode"  # the one column of the rows made up when there is no dataset
SEED_RANGE = 2**31  # reset seeds stay in numpy's range
SCORE_SHAPING = ("missing_eos_penalty", "normalize_rewards", "reward_clip")


class EnvironmentRunner:
    """How a trainer plays episodes: the environment factory (one fresh environment per episode), the config's
    max_turns / max_episode_tokens / env_errors, and whether the dataset was made up (options then None)."""

    def __init__(self, env_factory, args, tokenizer, *, tool_form: bool = False):
        if not callable(env_factory):
            raise TypeError(f"env_factory: expected a callable returning an environment, got {type(env_factory)}")
        for name in SCORE_SHAPING:  # PPO's single-score options: an episode's rewards arrive per step
            if getattr(args, name, None) not in (None, False):
                raise ValueError(
                    f"{name}: {getattr(args, name)!r} is not supported with an environment (rewards arrive per step, "
                    "not as one score per completion); remove it"
                )
        self.env_factory, self.args, self.tokenizer, self.tool_form = env_factory, args, tokenizer, tool_form
        self.placeholder = False
        self.last_metrics = {}

    @classmethod
    def build(cls, env_factory, environment_factory, tools, args, tokenizer) -> Optional["EnvironmentRunner"]:
        """The runner for `env_factory` (gym form) or TRL's `environment_factory` / `tools` (tool form), or None."""
        if env_factory is not None and (environment_factory is not None or tools):
            raise ValueError("env_factory: pass either env_factory or environment_factory/tools, not both")
        if environment_factory is not None or tools:
            from rlhf_ext.environments.tools import as_environment_factory

            return cls(as_environment_factory(environment_factory, tools), args, tokenizer, tool_form=True)
        return None if env_factory is None else cls(env_factory, args, tokenizer)

    @staticmethod
    def datasets(runner: Optional["EnvironmentRunner"], train_dataset, eval_dataset, rows: int, args, tokenizer):
        """(train_dataset, eval_dataset, tokenize) for `BaseTrainer.load_datasets`: without a runner, as given,
        with the prompts tokenized. With one: the rows whose dicts go to reset(options=...), or `rows` made-up rows
        {"episode": i} (then options is None) when there is no train_dataset, and nothing to tokenize
        (environments render their own prompts)."""
        if runner is None:
            return (
                train_dataset,
                eval_dataset,
                lambda data, name: tokenize_prompts(
                    data, tokenizer, args.max_prompt_length, args.dataset_num_proc, name
                ),
            )
        if eval_dataset is not None:
            raise ValueError("eval_dataset: not supported with an environment (evaluate by playing episodes)")
        if train_dataset is None:
            runner.placeholder = True
            train_dataset = [{PLACEHOLDER_COLUMN: i} for i in range(rows)]
        return train_dataset, None, lambda data, name: data

    @torch.no_grad()
    def play(self, trainer, rows: dict, step: int, row_offset: int, group_size: int = 1):
        """(EpisodeBatch, Rollout view of it, seconds) for this process's rows of step `step` (global rows
        `row_offset`, ...); rows in groups of `group_size` consecutive rows share a reset seed."""
        args = self.args
        count = len(next(iter(rows.values())))
        first = row_offset // group_size
        seeds = [sampling_key(args.seed, step, (row_offset + i) // group_size) % SEED_RANGE for i in range(count)]
        options = None if self.placeholder else [{k: v[i] for k, v in rows.items()} for i in range(count)]
        device = trainer.device
        generator = torch.Generator(device=device).manual_seed(sampling_key(args.seed, step, first) % (2**63 - 1))
        timer = time.perf_counter()
        with trainer.gathered(trainer.policy):  # FSDP: weights in full, no collective inside
            trainer.policy.eval()
            batch = run_episodes(
                trainer.policy,
                self.tokenizer,
                [self.env_factory() for _ in range(count)],
                trainer.sampling,
                max_turns=args.max_turns,
                max_episode_tokens=args.max_episode_tokens,
                seeds=seeds,
                options=options,
                env_errors=args.env_errors,
                generator=generator,
            )
        seconds = time.perf_counter() - timer
        self.last_metrics = episode_metrics(batch, trainer.dist)
        return batch, as_rollout(batch), seconds

    def scores(self, trainer, rows: dict, batch: EpisodeBatch, rollout: Rollout):
        """(scores (B,), per_source (B, S) on the CPU): each episode's return plus the trainer's reward sources
        (if any) scoring the episode; reward functions get the dataset columns and `environments=`."""
        returns = batch.returns
        if trainer.reward_sources is None:
            return returns, torch.zeros((returns.shape[0], 0))
        P = batch.prompt_length
        prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.sequences[:, :P], batch.attention_mask[:, :P])]
        columns = {} if self.placeholder else dict(rows)
        columns["input_ids"] = prompts
        environments = batch.envs
        if self.tool_form:
            from rlhf_ext.environments.tools import environments_of

            environments = environments_of(batch.envs)
        columns["environments"] = environments
        total, per_source = trainer.reward_sources.score(columns, rollout)
        return returns + total, per_source


def as_rollout(batch: EpisodeBatch) -> Rollout:
    """The episodes as a `Rollout` (response = every token after the first observation), for the chunked scoring
    passes and the reward sources."""
    P = batch.prompt_length
    return Rollout(
        sequences=batch.sequences,
        prompt_length=P,
        prompt_mask=batch.attention_mask[:, :P],
        response_ids=batch.sequences[:, P:],
        response_mask=batch.attention_mask[:, P:],
        logprobs=batch.logprobs,
        finished=batch.terminated,
    )


def episode_metrics(batch: EpisodeBatch, dist) -> dict:
    """Means over every process's episodes: turns, per-turn and final reward, success / terminated / truncated /
    error fractions."""
    turns = batch.turns.float()
    stats = torch.stack(
        [
            turns,
            batch.returns,
            batch.final_reward,
            batch.success.float(),
            batch.terminated.float(),
            batch.truncated.float(),
            batch.failed.float(),
        ],
        dim=1,
    )  # (B, 7)
    stats = dist.all_gather(stats.to(batch.turns.device))  # (N, 7)
    turns, returns = stats[:, 0], stats[:, 1]
    return {
        "episodes/turns_mean": float(turns.mean()),
        "episodes/reward_per_turn": float(returns.sum() / turns.sum().clamp(min=1)),
        "episodes/return_mean": float(returns.mean()),
        "episodes/final_reward_mean": float(stats[:, 2].mean()),
        "episodes/success_rate": float(stats[:, 3].mean()),
        "episodes/terminated_rate": float(stats[:, 4].mean()),
        "episodes/truncated_rate": float(stats[:, 5].mean()),
        "episodes/error_rate": float(stats[:, 6].mean()),
    }


def episode_records(trainer, batch: EpisodeBatch, scores: torch.Tensor) -> list:
    """Every process's episodes as {"prompt", "completion", "reward"} rows (text without special tokens: the first
    observation, then the rest of the episode), for GRPO's log_completions."""
    tokenizer, P = trainer.processing_class, batch.prompt_length
    rows = [
        {
            "prompt": tokenizer.decode(ids[:P][mask[:P].bool()].tolist(), skip_special_tokens=True),
            "completion": tokenizer.decode(ids[P:][mask[P:].bool()].tolist(), skip_special_tokens=True),
            "reward": float(score),
        }
        for ids, mask, score in zip(batch.sequences, batch.attention_mask, scores.tolist())
    ]
    return [row for part in trainer.dist.gather_objects(rows) for row in part]


def _experience(batch: EpisodeBatch, **fields) -> Experience:
    """An Experience over the packed episodes: response = every token after the first observation, agent_mask
    splitting it; `fields` give the rest."""
    layout = (batch.sequences, batch.attention_mask, batch.prompt_length, batch.episode_mask, batch.terminated)
    names = ("sequences", "attention_mask", "prompt_length", "response_mask", "finished")
    return Experience(**dict(zip(names, layout)), agent_mask=batch.agent_mask, **fields)


@torch.no_grad()
def ppo_episode_experience(trainer, rows: dict, step: int, row_offset: int) -> Experience:
    """PPOTrainer.make_experience on episodes: see the module docstring."""
    batch, rollout, time_rollout = trainer.env.play(trainer, rows, step, row_offset)
    timer = time.perf_counter()
    agent = batch.agent_mask  # (B, T)
    old_logprobs, ref_logprobs, values = (x * agent for x in trainer.scoring_passes(rollout))
    scores, per_source = trainer.env.scores(trainer, rows, batch, rollout)
    time_scoring = time.perf_counter() - timer
    # Step rewards already sit on agent tokens; the reward sources' part of the score goes on the last one.
    extra_scores = scores - batch.returns  # (B,) the reward sources' part
    targets = ppo_targets(
        trainer.args,
        trainer.kl_coef,
        trainer.dist,
        old_logprobs,
        ref_logprobs,
        values,
        extra_scores,
        agent,
        step_rewards=batch.turn_rewards,
    )
    loss_mask = agent * (~batch.failed)[:, None]
    targets["advantages"] = targets["advantages"] * loss_mask
    return _experience(
        batch,
        loss_mask=loss_mask,
        scores=scores,
        per_source=per_source,
        time_rollout=time_rollout,
        time_scoring=time_scoring,
        **targets,
    )


@torch.no_grad()
def group_episode_experience(trainer, rows: dict, round_index: int, row_offset: int):
    """CriticFreeTrainer.generate_and_score on episodes: (experience, metrics); see the module docstring."""
    args, dist = trainer.args, trainer.dist
    G = args.num_generations
    batch, rollout, time_rollout = trainer.env.play(trainer, rows, round_index, row_offset, group_size=G)
    timer = time.perf_counter()
    size = args.local_rollout_forward_batch_size
    agent = batch.agent_mask  # (B, T)
    kl_in_reward = args.advantage_estimator != "grpo" and args.beta > 0
    old_logprobs = ref_logprobs = None
    if (trainer.steps_per_round > 1 or kl_in_reward) and args.old_logprobs_from_sampler:
        old_logprobs = batch.logprobs  # needed: the policy moves before the episodes are used up
    elif trainer.steps_per_round > 1 or kl_in_reward:
        old_logprobs = by_chunks(lambda *c: policy_logprobs(trainer.policy, *c, args, run=trainer.run), rollout, size)
        old_logprobs = old_logprobs * agent
    if args.beta > 0:
        ref_logprobs = by_chunks(
            lambda *c: reference_logprobs(trainer.policy, trainer.ref_model, *c, args, run=trainer.run), rollout, size
        )
        ref_logprobs = ref_logprobs * agent
    scores, per_source = trainer.env.scores(trainer, rows, batch, rollout)
    all_scores = dist.all_gather(scores.float())  # (N,) every process's episode returns, global row order
    advantages = critic_free_advantages(args, scores, all_scores, agent, old_logprobs, ref_logprobs, row_offset, dist)
    loss_mask = agent * (~batch.failed)[:, None]
    if args.mask_truncated_completions:
        loss_mask = loss_mask * batch.terminated[:, None]
    names = trainer.reward_sources.names if trainer.reward_sources is not None else []
    metrics = group_rollout_metrics(
        all_scores,
        dist.all_gather(per_source.to(trainer.device)),
        dist.all_gather(agent.sum(1)),
        dist.all_gather(batch.terminated.long()).bool(),
        G,
        names,
    )
    metrics.update(trainer.env.last_metrics)
    if args.log_completions:
        trainer.last_completions = episode_records(trainer, batch, scores)
    metrics.update({"time/rollout": time_rollout, "time/scoring": time.perf_counter() - timer})
    experience = _experience(
        batch,
        loss_mask=loss_mask,
        advantages=advantages * loss_mask,
        scores=scores,
        per_source=per_source,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        time_rollout=time_rollout,
        time_scoring=metrics["time/scoring"],
    )
    return experience, metrics
