"""Sampling and scoring eval prompts: the scored completions `generate_completions` returns (PPO and GRPO) and the
metrics each trainer's `evaluate` reports. Nothing here touches a training run's random streams."""

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_ext.generation import SamplingSettings, complete, left_pad
from rlhf_ext.ops import kl_penalty
from rlhf_ext.trainers.advantages import group_stats
from rlhf_ext.trainers.distributed import zero_fields
from rlhf_ext.trainers.experience import call, has_reference, policy_logprobs, reference_logprobs, sample_completions
from rlhf_ext.trainers.reward_sources import decode_completions


@torch.no_grad()
def completion_records(
    policy,
    ref_model,
    reward_sources,
    dataset,
    settings: SamplingSettings,
    args,
    *,
    max_rows: Optional[int] = None,
    greedy: bool = False,
    seed: Optional[int] = None,
    run=call,
) -> list:
    """[{"prompt", "completion", "score", "kl", "finished"}] for the first `max_rows` rows (default: all) of a
    tokenized prompt dataset, sampled (or with `greedy` decoded) per_device_eval_batch_size prompts at a time from
    one generator seeded with `seed` (default args.seed), so that it never changes a training run's draws. "kl" is
    the summed k1 KL to the reference, None without one. Under FSDP call it with the weights gathered."""
    if dataset is None:
        raise ValueError("generate_completions: no dataset given and no eval_dataset")
    count = len(dataset) if max_rows is None else min(max_rows, len(dataset))
    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed if seed is None else seed)
    settings = settings.greedy() if greedy else settings
    results = []
    policy.eval()
    for first in range(0, count, args.per_device_eval_batch_size):
        rows = dataset[first : min(count, first + args.per_device_eval_batch_size)]
        prompt_ids, prompt_mask = left_pad(rows["input_ids"], settings.pad_token_id, device)
        rollout = complete(policy, prompt_ids, prompt_mask, settings, generator=generator)
        scores, _ = reward_sources.score(rows, rollout)
        sequences, attention_mask, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length
        kl = [None] * len(scores)  # no reference policy (e.g. GRPO with beta = 0): no KL to report
        if has_reference(policy, ref_model):
            logprobs = policy_logprobs(policy, sequences, attention_mask, P, args)
            ref = reference_logprobs(policy, ref_model, sequences, attention_mask, P, args, run=run)
            kl = (kl_penalty(logprobs, ref, "k1") * rollout.response_mask.float()).sum(1).tolist()
        prompts, completions, _ = decode_completions(reward_sources.tokenizer, rows, rollout)
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


@torch.no_grad()  # and before gathered(): FSDP gathers weights only for no-grad work
def trainer_completions(trainer, dataset=None, max_rows=None, greedy: bool = False, seed=None) -> list:
    """A PPO or critic-free trainer's `generate_completions`: `completion_records` of its policy, reference and
    reward sources over `dataset` (default: its eval_dataset). Every FSDP rank calls it (no collective inside)."""
    dataset = trainer.eval_dataset if dataset is None else dataset
    with trainer.gathered(trainer.policy, trainer.ref_model):
        return completion_records(
            trainer.policy,
            trainer.ref_model,
            trainer.reward_sources,
            dataset,
            trainer.sampling,
            trainer.args,
            max_rows=max_rows,
            greedy=greedy,
            seed=seed,
            run=trainer.run,
        )


def completion_metrics(records: list, with_reference: bool) -> dict:
    """PPO's eval metrics over `completion_records`: mean score, EOS rate and (with a reference) summed KL."""
    n = len(records)
    metrics = {
        "eval/scores": sum(r["score"] for r in records) / n,
        "eval/eos_fraction": sum(r["finished"] for r in records) / n,
    }
    if with_reference:
        metrics["eval/kl"] = sum(r["kl"] for r in records) / n
    return metrics


@dataclass
class EvalSums:
    """evaluate's totals over this process's eval completions (0-dim float64 tensors), then over processes."""

    rewards: torch.Tensor
    group_stds: torch.Tensor  # the std of each completion's group, summed over completions
    lengths: torch.Tensor  # response tokens
    truncated: torch.Tensor  # completions without a stop token
    rows: torch.Tensor  # completions


@torch.no_grad()
def group_eval_sums(policy, reward_sources, eval_dataset, settings: SamplingSettings, args, dist) -> EvalSums:
    """This process's totals over num_generations samples of its share of the eval prompts (every
    world_size-th prompt), per_device_eval_batch_size completions at a time. Under FSDP call it with the policy's
    weights gathered."""
    G = args.num_generations
    prompts_per_chunk = max(1, args.per_device_eval_batch_size // G)
    mine = list(range(dist.rank, len(eval_dataset), dist.world_size))
    sums = zero_fields(EvalSums, next(policy.parameters()).device)
    for first in range(0, len(mine), prompts_per_chunk):
        indices = [i for i in mine[first : first + prompts_per_chunk] for _ in range(G)]
        rows = eval_dataset[indices]
        # keyed apart from training's (step >= 0) and from the other processes' chunks
        rollout = sample_completions(
            policy, rows["input_ids"], settings, seed=args.seed, step=-1 - first, row_offset=dist.rank * 1_000_003
        )
        scores, _ = reward_sources.score(rows, rollout)
        sums.rewards += scores.sum().double()
        sums.group_stds += group_stats(scores, G)[1].sum().double()
        sums.lengths += rollout.response_mask.sum().double()
        sums.truncated += (~rollout.finished).sum().double()
        sums.rows += len(indices)
    return sums


def group_eval_metrics(total: EvalSums) -> dict:
    """GRPO's eval metrics from the EvalSums of every process (summed: floats)."""
    n = max(total.rows, 1.0)
    return {
        "eval_reward": total.rewards / n,
        "eval_reward_std": total.group_stds / n,
        "eval_completions/mean_length": total.lengths / n,
        "eval_completions/clipped_ratio": total.truncated / n,
    }
