"""One PPO step: rlhf_ext's PPOTrainer (fused ops + rollout engine) against the same step built from the
eager pieces RLHF code uses today (HF `generate`, full log_softmax + gather, the Python GAE loop,
composed elementwise PPO loss). Same models, prompts, batch and hyperparameters; the time is split into
rollout (generation), scoring (old/ref log-probs, values, reward model) and update.

Full size (the issue's): a ~20M-parameter Llama (V=32000), batch 32, 128 new tokens:
    python benchmarks/bench_ppo_step.py            # prints the per-phase table
    pytest benchmarks/bench_ppo_step.py            # pytest-benchmark; the speedup is printed at the end
`--reduced` is a quick CPU check (smaller model, batch 8, 32 tokens); RLHF_EXT_BENCH_QUICK=1 (make test)
shrinks everything to a smoke run.
"""

import copy
import functools
import time

import pytest
import torch

import rlhf_ext  # noqa: F401  (loads the kernels)
from benchmarks.conftest import sizes, sync
from benchmarks.rl_step import DEVICE, bench_step, eager_phases, eager_update, hf_generate, logprobs_eager, main, world
from rlhf_ext.models import hidden_states, last_token_index, score_head
from rlhf_ext.ops.reference import gae_reference, masked_whiten_reference

FULL = dict(vocab=32000, hidden=384, layers=6, heads=6, batch=32, prompt=32, new_tokens=128, epochs=1, mini_batches=2)
REDUCED = dict(vocab=32000, hidden=128, layers=2, heads=4, batch=8, prompt=16, new_tokens=32, epochs=1, mini_batches=2)
QUICK = dict(vocab=512, hidden=32, layers=1, heads=2, batch=4, prompt=8, new_tokens=8, epochs=1, mini_batches=2)
COMMON = dict(
    temperature=1.0, kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, lr=1e-5
)


def prepare_ours(tok, policy, rm, rows, size, device):
    """The trainer's own step (make_experience: rollout + scoring; ppo_update), built outside the timing."""
    from rlhf_ext import PPOConfig, PPOTrainer

    args = PPOConfig(
        output_dir="/tmp/rlhf_ext_bench",
        use_cpu=device == "cpu",
        disable_tqdm=True,
        report_to="none",
        per_device_train_batch_size=size["batch"] // size["mini_batches"],
        gradient_accumulation_steps=size["mini_batches"],
        num_mini_batches=size["mini_batches"],
        num_ppo_epochs=size["epochs"],
        response_length=size["new_tokens"],
        temperature=COMMON["temperature"],
        kl_coef=COMMON["kl_coef"],
        learning_rate=COMMON["lr"],
        stop_token=None,
        save_strategy="no",
        num_sample_generations=0,
        fused_linear_logprobs=True,
        max_steps=1,
    )
    trainer = PPOTrainer(args, tok, policy, reward_model=rm, train_dataset=rows)
    trainer.create_optimizer_and_scheduler([trainer.policy, trainer.critic], 1)
    batch = trainer.train_dataset[list(range(len(rows)))]

    def step():
        sync(device)
        exp = trainer.make_experience(batch)
        sync(device)
        start = time.perf_counter()
        trainer.ppo_update(exp)
        sync(device)
        return {"rollout": exp.time_rollout, "scoring": exp.time_scoring, "update": time.perf_counter() - start}

    return step


def _values(critic, ids, attn, P):
    return score_head(critic)(hidden_states(critic, ids, attn)[:, P - 1 : -1])[..., 0].float()


def prepare_eager(tok, policy, rm, rows, size, device):
    """The same step from eager pieces, written the way TRL-style trainers do it."""
    from rlhf_ext.trainers.data import pad

    ref, critic = copy.deepcopy(policy).eval(), copy.deepcopy(rm)
    params = list(policy.parameters()) + list(critic.parameters())
    optimizer = torch.optim.AdamW(params, lr=COMMON["lr"])
    prompt_ids, prompt_mask = pad([r["input_ids"] for r in rows], tok.pad_token_id, "left", device)
    return functools.partial(
        eager_step, policy, ref, critic, rm, optimizer, params, prompt_ids, prompt_mask, tok, len(rows), size, device
    )


def eager_step(policy, ref, critic, rm, optimizer, params, prompt_ids, prompt_mask, tok, batch, size, device):
    c = COMMON
    P = prompt_ids.shape[1]
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = hf_generate(
            policy, prompt_ids, prompt_mask, tok, size, c["temperature"], min_new_tokens=size["new_tokens"]
        )
        sync(device)
        t1 = time.perf_counter()
        mask = torch.ones_like(seq[:, P:], dtype=torch.float32)
        attn = torch.cat([prompt_mask, mask.long()], 1)
        old_lp, _ = logprobs_eager(policy, seq, attn, P, c["temperature"])
        ref_lp, _ = logprobs_eager(ref, seq, attn, P, c["temperature"])
        values = _values(critic, seq, attn, P)
        hidden = hidden_states(rm, seq, attn)
        scores = score_head(rm)(hidden[torch.arange(batch), last_token_index(attn)])[:, 0].float()
        rewards = -c["kl_coef"] * (old_lp - ref_lp)
        rewards[:, -1] += scores
        advantages, returns = gae_reference(rewards, values, mask, c["gamma"], c["lam"])
        advantages = masked_whiten_reference(advantages, mask)
    sync(device)
    t2 = time.perf_counter()
    policy.train()
    critic.train()
    mini = batch // size["mini_batches"]
    for _ in range(size["epochs"]):
        order = torch.randperm(batch)
        for start in range(0, batch, mini):
            idx = order[start : start + mini].to(device)
            new_lp, entropy = logprobs_eager(policy, seq[idx], attn[idx], P, c["temperature"])
            new_values = _values(critic, seq[idx], attn[idx], P)
            ratio = torch.exp(new_lp - old_lp[idx])
            pg = torch.max(
                -advantages[idx] * ratio, -advantages[idx] * ratio.clamp(1 - c["cliprange"], 1 + c["cliprange"])
            )
            v_clipped = values[idx] + (new_values - values[idx]).clamp(-c["cliprange_value"], c["cliprange_value"])
            vf = 0.5 * torch.max((new_values - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2)
            m = mask[idx]
            loss = (pg * m).sum() / m.sum() + c["vf_coef"] * (vf * m).sum() / m.sum()
            eager_update(loss, params, optimizer, entropy, m)
    return eager_phases(t0, t1, t2, device)


PREPARE = {"eager": prepare_eager, "fused": prepare_ours}
SIZE = sizes(FULL, QUICK)
TITLE = (
    "PPO step on {device}: Llama {{params}} params, V={vocab}, batch {batch}, {new_tokens} new tokens, "
    "{epochs} epoch x {mini_batches} minibatches"
)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_ppo_step(benchmark, impl):
    group = f"ppo_step {DEVICE} V={SIZE['vocab']} B={SIZE['batch']} new={SIZE['new_tokens']}"
    bench_step(benchmark, group, impl, PREPARE, world(tuple(SIZE.items()), DEVICE, True), SIZE, DEVICE)


if __name__ == "__main__":
    main(
        __doc__,
        PREPARE,
        TITLE,
        FULL,
        ("--reduced", REDUCED, "smaller model, batch 8, 32 tokens: a quick CPU check"),
        True,
    )
