"""One GRPO step: rlhf_ext's GRPOTrainer (rollout engine + fused log-prob and loss ops) against the same step
built from the eager pieces GRPO code uses today (HF `generate`, full log_softmax + gather for the policy and
the reference, group advantages and the clipped loss with the k3 KL composed elementwise). Same model,
prompts, rule reward and hyperparameters (beta > 0, so the reference forward is part of the step); the
time is split into rollout (generation), scoring (reference log-probs, rewards, advantages) and update.

Full size (the issue's): the ~20M-parameter Llama of bench_ppo_step (V=32000), 8 prompts x 8 generations,
128 new tokens:
    python benchmarks/bench_grpo_step.py           # prints the per-phase table
    pytest benchmarks/bench_grpo_step.py           # pytest-benchmark; the speedup is printed at the end
RLHF_EXT_BENCH_QUICK=1 (make test) shrinks everything to a smoke run.
"""

import copy
import functools
import time

import pytest
import torch

import rlhf_ext  # noqa: F401  (loads the kernels)
from benchmarks.conftest import sizes, sync
from benchmarks.rl_step import DEVICE, bench_step, eager_phases, eager_update, hf_generate, logprobs_eager, main, world

FULL = dict(vocab=32000, hidden=384, layers=6, heads=6, batch=8, generations=8, prompt=32, new_tokens=128)
QUICK = dict(vocab=512, hidden=32, layers=1, heads=2, batch=2, generations=4, prompt=8, new_tokens=8)
COMMON = dict(temperature=1.0, beta=0.04, epsilon=0.2, lr=1e-5)


def even_fraction(prompts, completions, completion_ids, **columns):
    """The rule reward both implementations score with: the share of even token ids."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def prepare_ours(tok, policy, rows, size, device):
    from rlhf_ext import GRPOConfig, GRPOTrainer

    G = size["generations"]
    args = GRPOConfig(
        output_dir="/tmp/rlhf_ext_bench_grpo",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        report_to="none",
        per_device_train_batch_size=size["batch"] * G,
        num_generations=G,
        max_completion_length=size["new_tokens"],
        max_prompt_length=None,
        temperature=COMMON["temperature"],
        beta=COMMON["beta"],
        epsilon=COMMON["epsilon"],
        learning_rate=COMMON["lr"],
        save_strategy="no",
        fused_linear_logprobs=True,
        max_steps=1,
    )
    trainer = GRPOTrainer(policy, [even_fraction], args=args, train_dataset=rows, processing_class=tok)
    trainer.create_optimizer_and_scheduler([trainer.policy], 1)
    batch = trainer.train_dataset[[i for i in range(len(rows)) for _ in range(G)]]

    def step():
        sync(device)
        buffer, metrics = trainer.generate_and_score(batch, 0, 0)
        sync(device)
        start = time.perf_counter()
        trainer.update(buffer, 0)
        sync(device)
        return {
            "rollout": metrics["time/rollout"],
            "scoring": metrics["time/scoring"],
            "update": time.perf_counter() - start,
        }

    return step


def prepare_eager(tok, policy, rows, size, device):
    """The same step from eager pieces, written the way TRL-style GRPO code does it."""
    from rlhf_ext.trainers.data import pad

    G = size["generations"]
    ref = copy.deepcopy(policy).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=COMMON["lr"])
    prompt_ids, prompt_mask = pad([r["input_ids"] for r in rows for _ in range(G)], tok.pad_token_id, "left", device)
    return functools.partial(eager_step, policy, ref, optimizer, prompt_ids, prompt_mask, tok, G, size, device)


def eager_step(policy, ref, optimizer, prompt_ids, prompt_mask, tok, G, size, device):
    c = COMMON
    P = prompt_ids.shape[1]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = hf_generate(policy, prompt_ids, prompt_mask, tok, size, c["temperature"], eos_token_id=tok.eos_token_id)
        sync(device)
        t1 = time.perf_counter()
        completion = seq[:, P:]
        is_eos = completion == tok.eos_token_id
        mask = ((is_eos.cumsum(1) - is_eos.long()) == 0).float()  # up to and including the first EOS
        ids = [row[: int(n)].tolist() for row, n in zip(completion, mask.sum(1))]
        rewards = torch.tensor(even_fraction(None, None, ids), device=device)
        grouped = rewards.view(-1, G)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        attn = torch.cat([prompt_mask, mask.long()], 1)
        ref_lp, _ = logprobs_eager(ref, seq, attn, P, c["temperature"])
    sync(device)
    t2 = time.perf_counter()
    policy.train()
    logprobs, entropy = logprobs_eager(policy, seq, attn, P, c["temperature"])
    ratio = torch.exp(logprobs - logprobs.detach())
    pg = -torch.min(ratio * advantages, ratio.clamp(1 - c["epsilon"], 1 + c["epsilon"]) * advantages)
    kl = torch.exp(ref_lp - logprobs) - (ref_lp - logprobs) - 1
    loss = ((pg + c["beta"] * kl) * mask).sum() / mask.sum()  # DAPO's token mean
    eager_update(loss, policy.parameters(), optimizer, entropy, mask)
    return eager_phases(t0, t1, t2, device)


PREPARE = {"eager": prepare_eager, "fused": prepare_ours}
SIZE = sizes(FULL, QUICK)
TITLE = (
    "GRPO step on {device}: Llama {{params}} params, V={vocab}, {batch} prompts x {generations} generations, "
    "{new_tokens} new tokens, beta=" + str(COMMON["beta"])
)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_grpo_step(benchmark, impl):
    group = f"grpo_step {DEVICE} V={SIZE['vocab']} {SIZE['batch']}x{SIZE['generations']} new={SIZE['new_tokens']}"
    bench_step(benchmark, group, impl, PREPARE, world(tuple(SIZE.items()), DEVICE, False), SIZE, DEVICE)


if __name__ == "__main__":
    main(__doc__, PREPARE, TITLE, FULL, ("--quick", QUICK, "the smoke size of make test"), False)
