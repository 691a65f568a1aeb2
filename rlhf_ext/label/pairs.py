"""`label pairs`: sample completions from a policy through the one completion path and write comparison pairs.

Each prompt gets `n` sampled completions; every two distinct completions of one prompt make a pair
(n=2: one pair, n=4: six). Pair ids are content hashes, so sampling again never collides with pairs
already in a feedback database.
"""

import itertools

import torch

from rlhf_ext.generation import SamplingSettings, complete, response_texts
from rlhf_ext.jsonl import read_jsonl, write_jsonl  # noqa: F401  (write_jsonl: `label pairs` writes with it)
from rlhf_ext.label.store import item_id_for


def load_prompts(path) -> list:
    """Prompts from JSON lines, each an object with a string `prompt`."""
    prompts = []
    for line_no, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(
                f"{path}, line {line_no}: expected an object with a string 'prompt', got {str(row)[:80]!r}"
            )
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts


def sample_completions(
    model,
    tokenizer,
    prompts,
    *,
    n: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 8,
) -> list:
    """For each prompt, `n` completion strings (special tokens removed), sampled through
    `rlhf_ext.generation.complete`. One torch.Generator seeded with `seed` drives every batch, so a run is
    reproducible for a given seed and batch size."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (completions per prompt to compare), got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (pairs need sampling), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if tokenizer.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left (prompts end where generation starts)")
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    completions = []
    # Tokenised a batch at a time (each batch padded to its own longest prompt), all drawn from one generator.
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        # (B*n, P): each prompt repeated n times, left-padded
        prompt_ids = encoded["input_ids"].repeat_interleave(n, dim=0).to(device)
        prompt_mask = encoded["attention_mask"].repeat_interleave(n, dim=0).to(device)
        rollout = complete(model, prompt_ids, prompt_mask, settings, generator=generator)
        texts, _ = response_texts(tokenizer, rollout)
        completions.extend(texts[i : i + n] for i in range(0, len(texts), n))
    return completions


def make_pairs(prompts, completions, model_name: str = "") -> tuple:
    """Pair rows (dicts ready for JSON) from prompts and their completions; identical or empty completions
    are not compared (`label serve` refuses such pairs), and a pair met twice (a repeated prompt) is written
    once. Returns (rows, number of pairs skipped)."""
    rows, identical, seen = [], 0, set()
    for prompt_index, (prompt, samples) in enumerate(zip(prompts, completions)):
        for i, j in itertools.combinations(range(len(samples)), 2):
            pair_id = item_id_for(prompt, samples[i], samples[j])
            empty = not samples[i].strip() or not samples[j].strip()
            if empty or samples[i] == samples[j] or pair_id in seen:
                identical += 1
                continue
            seen.add(pair_id)
            rows.append(
                {
                    "id": pair_id,
                    "prompt": prompt,
                    "completion_a": samples[i],
                    "completion_b": samples[j],
                    "origin": {"model": model_name, "prompt_index": prompt_index, "samples": [i, j]},
                }
            )
    return rows, identical
