"""A multi-turn text game learned from scratch: a tiny Llama plays guess-the-number (1..8, higher/lower feedback,
4 guesses; rlhf_ext.environments.games.GuessNumberEnv) and is trained by PPO or GRPO on the environment alone:
`PPOTrainer(..., env_factory=GuessNumberEnv)`, `GRPOTrainer(..., env_factory=GuessNumberEnv)`, no dataset.

    python examples/guess_number_rl.py --algorithm ppo     # CPU minutes
    python examples/guess_number_rl.py --algorithm grpo
    python examples/guess_number_rl.py --quick             # both, a few steps each (what the test suite runs)

An episode is one token sequence: the first observation "guess 1 to 8 :", the agent's guess ("4" EOS), the
game's reply " higher 5 to 8 :", the next guess, ... Only the agent's tokens are trained. Rewards: -0.1 per wrong
guess, another -0.1 for a guess already ruled out (or no number), +1 for the right one (per-turn shaping + final
reward). PPO's critic sees every turn's reward where it was earned; GRPO uses the episode's return, normalised
within a group of episodes from the same reset seed (the same hidden number).

Held-out success rate and turns per episode (greedy, 200 unseen seeds) are printed before and after training.
"""

import os
import tempfile
import time

import torch
from example_common import before_after, parse_command_line

from rlhf_ext.environments.games import GuessNumberEnv

SETTINGS = {
    # training steps per algorithm, episodes per step, learning rate, held-out episodes
    "full": dict(steps={"ppo": 30, "grpo": 60}, episodes=64, lr=2e-3, held_out=200),
    "quick": dict(steps={"ppo": 1, "grpo": 1}, episodes=8, lr=2e-3, held_out=8),
}
NUM_GENERATIONS = 8  # GRPO: episodes per reset seed
MAX_TURNS = 4
HELD_OUT_SEED = 1_000_000  # evaluation seeds start here; the trainers draw theirs from the run's seed


def build_tokenizer_and_model(seed: int):
    """A word-level tokenizer over the game's words and a tiny randomly initialised Llama."""
    from rlhf_ext.models.tiny import build_tokenizer, tiny_causal_lm

    corpus = ["guess higher lower say a number to correct : 0 1 2 3 4 5 6 7 8 9"] * 4
    tok = build_tokenizer(corpus, vocab_size=64, kind="wordlevel", chat_template=False)
    model = tiny_causal_lm(
        "llama", tokenizer=tok, seed=seed, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64
    )
    return tok, model


@torch.no_grad()
def evaluate(model, tok, episodes: int) -> dict:
    """Greedy play on held-out seeds: success rate, mean turns, mean return."""
    from rlhf_ext.environments.rollout import run_episodes
    from rlhf_ext.generation.completions import SamplingSettings

    model.eval()
    settings = SamplingSettings(max_new_tokens=2, pad_token_id=tok.pad_token_id, temperature=0.0)
    batch = run_episodes(
        model,
        tok,
        [GuessNumberEnv() for _ in range(episodes)],
        settings,
        max_turns=MAX_TURNS,
        seeds=[HELD_OUT_SEED + i for i in range(episodes)],
    )
    return {
        "success": float(batch.success.float().mean()),
        "turns": float(batch.turns.float().mean()),
        "return": float(batch.returns.mean()),
    }


def train(algorithm: str, model, tok, s: dict, seed: int, output_dir: str):
    """The trained policy after `s["steps"][algorithm]` steps of PPO or GRPO on the game."""
    from rlhf_ext import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer

    common = dict(
        output_dir=os.path.join(output_dir, algorithm),
        max_steps=s["steps"][algorithm],
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        temperature=1.0,
        max_turns=MAX_TURNS,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=seed,
        logging_steps=10,
    )
    if algorithm == "ppo":
        args = PPOConfig(
            per_device_train_batch_size=s["episodes"],
            response_length=2,
            num_ppo_epochs=2,
            num_mini_batches=2,
            kl_coef=0.0,
            gamma=1.0,
            lam=0.95,
            num_sample_generations=0,
            **common,
        )
        trainer = PPOTrainer(args, tok, model, env_factory=GuessNumberEnv)
    else:
        args = GRPOConfig(
            per_device_train_batch_size=s["episodes"],
            num_generations=NUM_GENERATIONS,
            max_completion_length=2,
            beta=0.0,
            **common,
        )
        trainer = GRPOTrainer(model, None, args=args, processing_class=tok, env_factory=GuessNumberEnv)
    logs = [entry for entry in trainer.train().log_history if "episodes/success_rate" in entry]
    return trainer.policy, logs


def main(mode: str = "full", algorithms=("ppo", "grpo"), seed: int = 0, output_dir=None) -> dict:
    from transformers import set_seed

    s = SETTINGS[mode]
    output_dir = output_dir or tempfile.mkdtemp(prefix="guess_number_")
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    results = {}
    for algorithm in algorithms:
        set_seed(seed)
        tok, model = build_tokenizer_and_model(seed)
        before = evaluate(model, tok, s["held_out"])
        start = time.time()
        policy, logs = train(algorithm, model, tok, s, seed, output_dir)
        after = evaluate(policy, tok, s["held_out"])
        train_success = f"{logs[0]['episodes/success_rate']:.2f} -> {logs[-1]['episodes/success_rate']:.2f}"
        print(
            f"{algorithm.upper()} ({s['steps'][algorithm]} steps x {s['episodes']} episodes, "
            f"{time.time() - start:.0f} s): "
            f"held-out {before_after(before, after, {'success': '.1%', 'turns': '.2f', 'return': '.2f'})} "
            f"(sampled training success {train_success})"
        )
        results[algorithm] = {"before": before, "after": after}
    return results


if __name__ == "__main__":
    cli = parse_command_line(
        __doc__,
        "a smoke run: a few steps of each algorithm",
        algorithm=dict(choices=["ppo", "grpo", "both"], default="both"),
    )
    chosen = ("ppo", "grpo") if cli.algorithm == "both" else (cli.algorithm,)
    main("quick" if cli.quick else "full", chosen, cli.seed, cli.output_dir)
