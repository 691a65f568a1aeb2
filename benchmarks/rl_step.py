"""Shared plumbing of the one-RL-step benchmarks (bench_ppo_step.py, bench_grpo_step.py): the tiny Llama world
(word-level tokenizer of V tokens, policy, reward model, prompts), the eager log-probs baseline both eager steps
use, and running / timing / reporting one step of each implementation from the same start."""

import argparse
import copy
import functools
import time

import torch
import torch.nn.functional as F

from benchmarks.conftest import benchmark_phases, print_phase_table, sync
from rlhf_ext.models import position_ids_from_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(size: dict, device):
    """(tokenizer, policy, reward model) with a real V-token word-level tokenizer."""
    from rlhf_ext.models.tiny import build_tokenizer, tiny_causal_lm, tiny_sequence_classifier

    words = [f"w{i}" for i in range(size["vocab"] - 7)]  # + 7 special tokens = V
    tok = build_tokenizer(
        [" ".join(words[i : i + 64]) for i in range(0, len(words), 64)],
        vocab_size=size["vocab"],
        kind="wordlevel",
        chat_template=False,
    )
    kw = dict(
        tokenizer=tok,
        hidden_size=size["hidden"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        max_position_embeddings=size["prompt"] + size["new_tokens"] + 8,
    )
    return tok, tiny_causal_lm("llama", **kw).to(device), tiny_sequence_classifier("llama", seed=1, **kw).to(device)


def prompts(tok, size):
    """`size["batch"]` rows {"input_ids"} of prompt["prompt"] // 2 .. size["prompt"] random word ids."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(size["batch"]):
        n = int(torch.randint(size["prompt"] // 2, size["prompt"] + 1, (1,), generator=g))
        rows.append({"input_ids": torch.randint(8, size["vocab"] - 8, (n,), generator=g).tolist()})
    return rows


@functools.lru_cache(maxsize=4)
def world(size_items: tuple, device: str, with_reward_model: bool) -> tuple:
    """(tokenizer, models, prompt rows): models = (policy, reward model) or (policy,), built once per size."""
    size = dict(size_items)
    tok, policy, rm = build(size, device)
    return tok, ((policy, rm) if with_reward_model else (policy,)), prompts(tok, size)


def hf_generate(policy, prompt_ids, prompt_mask, tok, size: dict, temperature: float, **stop):
    """[B, P + new] sequences from HF `generate` with plain sampling (no top-k / top-p) of up to size["new_tokens"]
    tokens: the eager rollout. `stop`: the step's stop rule (`eos_token_id=...` or `min_new_tokens=...`)."""
    policy.eval()
    return policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=temperature,
        max_new_tokens=size["new_tokens"],
        pad_token_id=tok.pad_token_id,
        **stop,
    )


def logprobs_eager(model, ids, attn, P, temperature):
    """(log-probs [B, R], entropy [B, R]) of the response ids[:, P:] from a full log_softmax: the eager baseline."""
    position_ids = position_ids_from_mask(attn)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits[:, P - 1 : -1] / temperature
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, R, V): the tensor the fused ops never build
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1), entropy


def eager_update(loss, params, optimizer, entropy, mask) -> None:
    """One optimizer step as TRL-style trainers take it: backward, gradient norm clipped to 1, step, and the masked
    mean entropy (mask [B, R] float, 1 on response tokens) read back to the host, logged as trainers do."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    _ = float((entropy.detach() * mask).sum() / mask.sum())


def eager_phases(t0: float, t1: float, t2: float, device: str) -> dict:
    """{phase: seconds} of an eager step that started rollout at t0, scoring at t1 and the update at t2 (perf_counter),
    once the device has finished the update."""
    sync(device)
    return {"rollout": t1 - t0, "scoring": t2 - t1, "update": time.perf_counter() - t2}


def fresh_step(prepare, the_world: tuple, size: dict, device: str):
    """`prepare(tok, *copies of the models, rows, size, device)` from seed 0: a step that starts where every other
    implementation's starts (the models are copied, so a step never trains the next one's)."""
    tok, models, rows = the_world
    torch.manual_seed(0)
    return prepare(tok, *(copy.deepcopy(m) for m in models), rows, size, device)


def run(prepare: dict, the_world: tuple, size: dict, device: str) -> dict:
    """{impl: {phase: seconds}} for one step of each implementation in `prepare` from the same start."""
    return {impl: fresh_step(fn, the_world, size, device)() for impl, fn in prepare.items()}


def report(title: str, the_world: tuple, results: dict) -> None:
    """Print `title` (formatted with the policy's parameter count, `{params}`) and the per-phase table."""
    params = sum(p.numel() for p in the_world[1][0].parameters())
    print(title.format(params=f"{params / 1e6:.1f}M"))
    print_phase_table(results)


def bench_step(benchmark, group: str, impl: str, prepare: dict, the_world: tuple, size: dict, device: str) -> None:
    """Time one step of `impl` for pytest-benchmark (its setup, building the step, untimed)."""
    benchmark_phases(benchmark, group, impl, lambda: fresh_step(prepare[impl], the_world, size, device))


def main(doc: str, prepare: dict, title: str, full: dict, smaller: tuple, with_reward_model: bool) -> None:
    """The benchmark file run as a script: one step of each implementation at the full size, or at the smaller
    size `smaller = (flag, size, help)` when that flag is given, then the per-phase table."""
    flag, small, help_text = smaller
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument(flag, action="store_true", dest="smaller", help=help_text)
    parser.add_argument("--device", default=DEVICE)
    cli = parser.parse_args()
    size = small if cli.smaller else full
    the_world = world(tuple(size.items()), cli.device, with_reward_model)
    report(title.format(device=cli.device, **size), the_world, run(prepare, the_world, size, cli.device))
