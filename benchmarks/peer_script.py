"""The one training script of the peer benchmark (bench_peers.py): a PPO or GRPO run on a tiny Llama, written
against TRL's API. `--impl trl` imports TRL's trainer, `--impl ours` rlhf_ext's; nothing else differs (the same
config fields, models, data, seed and threads). Run in its own process by bench_peers.py; its last stdout line is
a JSON record: seconds per optimisation step, our phase split when the trainer logs one, peak RSS.

    python benchmarks/peer_script.py --algo grpo --impl ours --size quick --steps 3 --threads 2

TRL's config defaults that would change what is computed are set explicitly (`config_kwargs`): bf16 (TRL: on
when fp16 is off) and gradient_checkpointing (TRL: on) are off, as in our trainers; the optimizer is both configs'
default, transformers 5's `adamw_torch_fused` (the same AdamW update in one fused kernel; `--optim adamw_torch`
runs both with the per-tensor loop instead); TRL 1.16's `use_bias_correction_kl` (the KL term times
the importance ratio: a different gradient when beta > 0) is off, the classic GRPO KL our trainer computes.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import sys
import time

import torch

SIZES = {
    # The shapes (benchmarks/bench_ppo_step.py, bench_grpo_step.py): a ~20M-parameter Llama, V = 32000.
    "full": {
        "ppo": dict(vocab=32000, hidden=384, layers=6, heads=6, batch=32, prompt=32, new_tokens=128, mini_batches=2),
        "grpo": dict(vocab=32000, hidden=384, layers=6, heads=6, batch=8, generations=8, prompt=32, new_tokens=128),
    },
    # The default of bench_peers.py and the README's figures: the same Llama, narrower and shallower, half the
    # batch and response length (on the 2-core machine at load ~13 a step still took one to a few minutes).
    "small": {
        "ppo": dict(vocab=32000, hidden=256, layers=4, heads=4, batch=16, prompt=32, new_tokens=64, mini_batches=2),
        "grpo": dict(vocab=32000, hidden=256, layers=4, heads=4, batch=4, generations=8, prompt=32, new_tokens=64),
    },
    # A smoke run for the tests: seconds, not minutes.
    "quick": {
        "ppo": dict(vocab=512, hidden=32, layers=1, heads=2, batch=4, prompt=8, new_tokens=8, mini_batches=2),
        "grpo": dict(vocab=512, hidden=32, layers=1, heads=2, batch=2, generations=4, prompt=8, new_tokens=8),
    },
}
COMMON = dict(temperature=1.0, learning_rate=1e-5, seed=0)
PPO = dict(kl_coef=0.05, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95)
GRPO = dict(beta=0.04, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group")
PHASES = ("time/rollout", "time/scoring", "time/update")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # what both configs accept for --optim (ours: SUPPORTED_OPTIMIZERS)
# Fields only TRL's config has, whose default computes something else than the classic algorithm ours runs.
TRL_ONLY = {"use_bias_correction_kl": False}


def tiny_module():
    """rlhf_ext/models/tiny.py loaded by path: the TRL process builds the same models without importing rlhf_ext
    (whose compiled core would count in its memory)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rlhf_ext", "models", "tiny.py")
    spec = importlib.util.spec_from_file_location("peer_tiny_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_world(size: dict):
    """(tokenizer, policy, reward model): a word-level tokenizer of exactly size["vocab"] tokens ("w0", "w1", ...
    plus 7 specials) and the stock Llama classes built from a config (the reward model from its own seed)."""
    tiny = tiny_module()
    words = [f"w{i}" for i in range(size["vocab"] - 7)]
    tok = tiny.build_tokenizer(
        [" ".join(words[i : i + 64]) for i in range(0, len(words), 64)],
        vocab_size=size["vocab"],
        kind="wordlevel",
        chat_template=False,
    )
    tok.padding_side = "left"  # TRL's PPO pads prompts with the tokenizer's collator; generation needs left
    kw = dict(
        tokenizer=tok,
        hidden_size=size["hidden"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        max_position_embeddings=size["prompt"] + size["new_tokens"] + 8,
    )
    return tok, tiny.tiny_causal_lm("llama", **kw), tiny.tiny_sequence_classifier("llama", seed=1, **kw)


def prompt_words(size: dict, rows: int) -> list:
    """`rows` prompts of size["prompt"] // 2 .. size["prompt"] random words (a fixed generator: same data for both)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(rows):
        n = int(torch.randint(size["prompt"] // 2, size["prompt"] + 1, (1,), generator=g))
        out.append(" ".join(f"w{int(i)}" for i in torch.randint(1, size["vocab"] - 8, (n,), generator=g)))
    return out


def even_fraction(prompts, completions, completion_ids, **columns):
    """GRPO's rule reward: the share of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def config_kwargs(algo: str, size: dict, steps: int, output_dir: str) -> dict:
    """The config fields both trainers get: the run's shape, the algorithm's hyperparameters and every TRL default
    that differs from ours set to the value both compute with."""
    same = dict(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        weight_decay=0.0,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **COMMON,
    )
    if algo == "ppo":
        batch, mini = size["batch"], size["mini_batches"]
        return dict(
            same,
            per_device_train_batch_size=batch // mini,
            gradient_accumulation_steps=mini,
            num_mini_batches=mini,
            num_ppo_epochs=1,
            total_episodes=batch * steps,
            response_length=size["new_tokens"],
            stop_token=None,
            missing_eos_penalty=None,
            whiten_rewards=False,
            local_rollout_forward_batch_size=batch,
            num_sample_generations=0,
            **PPO,
        )
    G = size["generations"]
    return dict(
        same,
        per_device_train_batch_size=size["batch"] * G,
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=size["new_tokens"],
        top_p=1.0,
        top_k=0,
        mask_truncated_completions=False,
        disable_dropout=True,
        log_completions=False,
        max_steps=steps,
        **GRPO,
    )


def trainer_classes(algo: str, impl: str):
    """The only line that differs between the peer and us: where the trainer comes from."""
    if impl == "trl":
        if algo == "ppo":
            from trl.experimental.ppo import PPOConfig, PPOTrainer

            return PPOConfig, PPOTrainer
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    if impl == "ours":
        if algo == "ppo":
            from rlhf_ext.trainers.ppo import PPOConfig, PPOTrainer

            return PPOConfig, PPOTrainer
        from rlhf_ext.trainers.grpo import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    raise ValueError(f"impl: expected 'trl' or 'ours', got {impl!r}")


def make_config(config_cls, algo: str, size: dict, steps: int, output_dir: str, optim=None):
    kwargs = config_kwargs(algo, size, steps, output_dir)
    if optim is not None:
        kwargs["optim"] = optim
    names = {f.name for f in dataclasses.fields(config_cls)}
    kwargs.update({k: v for k, v in TRL_ONLY.items() if k in names})
    return config_cls(**kwargs)


def step_timer():
    """A TrainerCallback recording when each optimisation step ends and our per-phase times from the logs."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks, self.phases = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and all(k in logs for k in PHASES):
                self.phases.append({k: float(logs[k]) for k in PHASES})

    return StepTimer()


def train(algo: str, impl: str, size: dict, steps: int, output_dir: str, optim=None):
    """Build the world, run `steps` optimisation steps of `impl`'s trainer; returns the StepTimer."""
    from datasets import Dataset

    config_cls, trainer_cls = trainer_classes(algo, impl)
    args = make_config(config_cls, algo, size, steps, output_dir, optim)
    torch.manual_seed(COMMON["seed"])
    tok, policy, reward_model = build_world(size)  # the GRPO run scores with a rule, not the reward model
    timer = step_timer()
    timer.optim = getattr(args.optim, "value", args.optim)  # the optimizer the run used (recorded in its JSON)
    if algo == "ppo":
        prompts = prompt_words(size, size["batch"] * steps)
        data = Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]})
        _, ref_policy, value_model = build_world(size)  # fresh copies: the same weights, separate modules
        trainer = trainer_cls(args, tok, policy, ref_policy, reward_model, data, value_model, callbacks=[timer])
    else:
        data = Dataset.from_dict({"prompt": prompt_words(size, size["batch"] * steps)})
        # By path: TRL's GRPOTrainer loads its reference model (beta > 0) from the policy's checkpoint.
        path = os.path.join(output_dir, "policy")
        policy.save_pretrained(path)
        trainer = trainer_cls(path, [even_fraction], args=args, train_dataset=data, processing_class=tok)
        trainer.add_callback(timer)
    trainer.train()
    return timer


def summary(timer, warmup: int) -> dict:
    """Median seconds per step after `warmup` steps, every step's seconds, and our median phase split."""
    seconds = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    measured = seconds[warmup:] or seconds
    out = {"step_seconds": statistics.median(measured), "all_step_seconds": seconds}
    phases = timer.phases[warmup:] or timer.phases
    if phases:
        out["phases"] = {k.split("/")[1]: statistics.median(p[k] for p in phases) for k in PHASES}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algo", choices=("ppo", "grpo"), required=True)
    parser.add_argument("--impl", choices=("trl", "ours"), required=True)
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=4, help="optimisation steps, the first one a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--output-dir", default="/tmp/rlhf_ext_bench_peers")
    parser.add_argument("--optim", choices=OPTIMIZERS, default=None, help="both configs' optim (default: theirs)")
    cli = parser.parse_args(argv)
    if cli.steps < 2:
        parser.error(f"--steps: expected >= 2 (one warm-up step, then measured ones), got {cli.steps}")
    torch.set_num_threads(cli.threads)
    size = SIZES[cli.size][cli.algo]
    output_dir = os.path.join(cli.output_dir, f"{cli.algo}-{cli.impl}")
    timer = train(cli.algo, cli.impl, size, cli.steps, output_dir, cli.optim)
    record = dict(
        algo=cli.algo,
        impl=cli.impl,
        size=size,
        steps=cli.steps,
        threads=cli.threads,
        torch=torch.__version__,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        **summary(timer, warmup=1),
        optim=timer.optim,
    )
    if cli.impl == "trl":
        import trl

        record["trl"] = trl.__version__
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
