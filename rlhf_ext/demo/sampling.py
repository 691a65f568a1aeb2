"""Sampling and scoring completions for the demo's evaluation, from the public pieces only: the rollout
completion path (`rlhf_ext.generation.complete`), `sequence_logprobs`, the `kl_penalty` op and `sequence_scores`.

`sample_and_score` draws completions from a policy and returns, per completion, its text, whether it
ended with EOS, its hidden `true_score`, its reward-model score (if a reward model is given) and its
per-sequence KL to a reference policy (if one is given):

    kl = sum_t [log pi(y_t | y_<t) - log pi_ref(y_t | y_<t)]   over the real response tokens (k1),

whose mean over samples y ~ pi is an unbiased estimate of KL(pi || pi_ref) per sequence.
"""

from typing import Optional

import torch

from rlhf_ext.demo.task import true_score
from rlhf_ext.generation import SamplingSettings, complete, left_pad, response_texts
from rlhf_ext.models.heads import sequence_scores
from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.ops import kl_penalty
from rlhf_ext.trainers.data import text_ids


@torch.no_grad()
def sample_and_score(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    ref_model=None,
    reward_model=None,
) -> list[dict]:
    """[{"prompt", "completion", "finished", "length", "true_score", "rm_score", "kl"}] for each prompt
    in order ("rm_score" / "kl" are None without a reward / reference model). One torch.Generator seeded
    with `seed` drives the sampling, so the same policy and seed give the same completions, and calling
    this never moves the global RNG of a training run."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        stop_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    results = []
    # A batch at a time (sampled, then scored), every batch drawing from the one generator.
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        prompt_ids, prompt_mask = left_pad([text_ids(tokenizer, p) for p in batch], tokenizer.pad_token_id, device)
        rollout = complete(model, prompt_ids, prompt_mask, settings, generator=generator)
        P, sequences = rollout.prompt_length, rollout.sequences  # (B, P + R)
        response_mask = rollout.response_mask  # (B, R): 1 up to and including EOS
        attention_mask = rollout.attention_mask  # (B, P + R)
        kl = rm_scores = None
        if ref_model is not None:
            logprobs = sequence_logprobs(model, sequences, attention_mask, P, temperature=temperature)
            ref_logprobs = sequence_logprobs(ref_model, sequences, attention_mask, P, temperature=temperature)
            kl = (kl_penalty(logprobs, ref_logprobs, "k1") * response_mask).sum(1).tolist()  # (B,)
        if reward_model is not None:
            rm_scores = sequence_scores(reward_model, sequences, attention_mask).tolist()  # (B,), read at EOS
        lengths = rollout.response_lengths.tolist()
        texts, _ = response_texts(tokenizer, rollout)
        for i, (prompt, text) in enumerate(zip(batch, texts)):
            results.append(
                {
                    "prompt": prompt,
                    "completion": text,
                    "finished": bool(rollout.finished[i]),
                    "length": int(lengths[i]),
                    "true_score": true_score(text),
                    "rm_score": None if rm_scores is None else float(rm_scores[i]),
                    "kl": None if kl is None else float(kl[i]),
                }
            )
    model.train(was_training)
    return results


def mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def win_rate(candidate: list[dict], baseline: list[dict]) -> dict:
    """Pairwise comparison by the hidden judge of two sample lists for the same prompts, row by row:
    a win counts 1, a tie (equal true scores) 1/2, a loss 0. Returns {"win_rate", "wins", "ties", "losses"}
    (the last three as fractions)."""
    if len(candidate) != len(baseline):
        raise ValueError(
            f"win_rate: expected as many candidate as baseline samples, got {len(candidate)} and {len(baseline)}"
        )
    for a, b in zip(candidate, baseline):
        if a["prompt"] != b["prompt"]:
            raise ValueError(f"win_rate: samples are not aligned by prompt ({a['prompt']!r} vs {b['prompt']!r})")
    n = len(candidate)
    wins = sum(a["true_score"] > b["true_score"] for a, b in zip(candidate, baseline)) / n
    ties = sum(a["true_score"] == b["true_score"] for a, b in zip(candidate, baseline)) / n
    return {"win_rate": wins + 0.5 * ties, "wins": wins, "ties": ties, "losses": 1.0 - wins - ties}
