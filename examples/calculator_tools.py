"""A tool environment in TRL's form: a tiny Llama learns to call a calculator to answer multiplication questions.

    python examples/calculator_tools.py            # CPU minutes
    python examples/calculator_tools.py --quick    # a smoke run (what the test suite runs)

The environment is written exactly as for TRL (`GRPOTrainer(..., environment_factory=CalculatorEnv)`): a class
whose public method `multiply` is the tool, described to the model by its type hints and docstring, and a reward
function that receives `environments=` and the dataset's `answer` column. A tiny model cannot multiply two-digit
numbers, so the only way to be right is the tool:

    <|system|>tools: multiply(a, b): Multiply two integers.;</s><|user|>compute 23 * 47</s>
    <|assistant|><tool_call>{"name": "multiply", "arguments": {"a": 23, "b": 47}}</tool_call></s>
    <|tool|>1081</s><|assistant|>answer:1081</s>

SFT on such conversations teaches the format (assistant turns only); it is stopped early, while the model
still miscopies numbers now and then, and GRPO then trains on unlabelled questions with the rule reward.
Accuracy (greedy) and the tool-use rate on held-out questions are printed after SFT and after GRPO.
"""

import random
import re
import time

import torch
from example_common import grpo_config, parse_command_line, start_run, train_sft

SETTINGS = {
    # SFT conversations and steps, GRPO steps, questions per GRPO step, learning rates, held-out questions
    "full": dict(sft_rows=1000, sft_steps=250, grpo_steps=30, prompts=8, sft_lr=1e-3, grpo_lr=5e-4, held_out=100),
    "quick": dict(sft_rows=16, sft_steps=4, grpo_steps=1, prompts=1, sft_lr=1e-3, grpo_lr=5e-4, held_out=4),
}
NUM_GENERATIONS = 8
MAX_TURNS = 3
TURN_TOKENS = 40  # tokens per agent turn at most: a tool call is about 25
_ANSWER = re.compile(r"answer:(-?\d+)")


class CalculatorEnv:
    """TRL-style tool environment: one instance per episode; `multiply` is the tool."""

    def __init__(self):
        self.calls = []

    def reset(self, **row):
        self.calls = []

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: the first factor
            b: the second factor
        """
        self.calls.append((a, b))
        return a * b


def correct_answer(completions, answer, environments=None, **kwargs):
    """1.0 when the episode's last "answer:N" is the product, else 0.0 (`environments` is there to read)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = _ANSWER.findall(completion)
        rewards.append(1.0 if found and int(found[-1]) == int(expected) else 0.0)
    return rewards


def questions(seed: int = 0):
    """(sft, rl, held_out) lists of (a, b) with a, b in [10, 100), disjoint."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[:1000], pairs[1000:5000], pairs[5000:]


def row_of(a: int, b: int) -> dict:
    return {"prompt": f"compute {a} * {b}", "answer": a * b}


def conversation(a: int, b: int, tools_text: str) -> list:
    """The SFT target for one question: call the tool, then answer with its result."""
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}
    return [
        {"role": "system", "content": tools_text},
        {"role": "user", "content": f"compute {a} * {b}"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(a * b)},
        {"role": "assistant", "content": f"answer:{a * b}"},
    ]


def build_tokenizer_and_model(seed: int):
    """A byte-level BPE tokenizer with the tool-call chat template, trained on text of this task's shape."""
    from rlhf_ext.models.tiny import build_tokenizer, tiny_causal_lm

    rng = random.Random(seed)
    corpus = []
    for _ in range(400):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        corpus.append(
            f'compute {a} * {b} <tool_call>{{"name": "multiply", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'
            f"{a * b} answer:{a * b} tools: multiply(a, b): Multiply two integers.;"
        )
    tok = build_tokenizer(corpus, vocab_size=320, kind="bpe", tool_calls=True)
    model = tiny_causal_lm(
        "llama", tokenizer=tok, seed=seed, hidden_size=128, num_layers=2, num_heads=4, max_position_embeddings=160
    )
    return tok, model


@torch.no_grad()
def evaluate(model, tok, pairs) -> dict:
    """Greedy accuracy and tool-use rate on `pairs`, played through the same adapter GRPO trains with."""
    from rlhf_ext.environments.rollout import run_episodes
    from rlhf_ext.environments.tools import as_environment_factory
    from rlhf_ext.generation.completions import SamplingSettings

    model.eval()
    make = as_environment_factory(CalculatorEnv)
    settings = SamplingSettings(max_new_tokens=TURN_TOKENS, pad_token_id=tok.pad_token_id, temperature=0.0)
    rows = [row_of(a, b) for a, b in pairs]
    batch = run_episodes(
        model, tok, [make() for _ in rows], settings, max_turns=MAX_TURNS, options=rows, seeds=list(range(len(rows)))
    )
    texts = ["".join(actions) for actions in batch.actions]
    correct = correct_answer(texts, [r["answer"] for r in rows])
    return {
        "accuracy": sum(correct) / len(rows),
        "tool_use": sum(bool(env.environment.calls) for env in batch.envs) / len(rows),
    }


def main(mode: str = "full", seed: int = 0, output_dir=None) -> dict:
    from rlhf_ext import GRPOTrainer
    from rlhf_ext.environments.tools import ToolEnvironment

    s = SETTINGS[mode]
    output_dir, common = start_run(seed, output_dir, "calculator_tools_")
    sft_pairs, rl_pairs, held_out = questions(seed)
    held_out = held_out[: s["held_out"]]
    tok, model = build_tokenizer_and_model(seed)
    # The system turn the template writes for the tools, so SFT conversations match what the rollout renders.
    schemas = ToolEnvironment(CalculatorEnv()).tool_schemas
    rendered = tok.apply_chat_template([{"role": "user", "content": ""}], tools=schemas, tokenize=False)
    tools_text = rendered.split("</s>")[0].removeprefix("<|system|>")
    start = time.time()

    rows = [{"messages": conversation(a, b, tools_text)} for a, b in sft_pairs[: s["sft_rows"]]]
    sft = train_sft(
        model,
        tok,
        rows,
        output_dir,
        common,
        max_steps=s["sft_steps"],
        per_device_train_batch_size=16,
        learning_rate=s["sft_lr"],
        assistant_only_loss=True,
    )
    before = evaluate(sft.model, tok, held_out)
    print(
        f"after SFT ({s['sft_steps']} steps on {s['sft_rows']} conversations): held-out accuracy "
        f"{before['accuracy']:.1%}, tool use {before['tool_use']:.1%}"
    )

    args = grpo_config(
        output_dir,
        common,
        prompts=s["prompts"],
        generations=NUM_GENERATIONS,
        max_steps=s["grpo_steps"],
        max_completion_length=TURN_TOKENS,
        max_turns=MAX_TURNS,
        learning_rate=s["grpo_lr"],
    )
    grpo = GRPOTrainer(
        sft.model,
        [correct_answer],
        args=args,
        train_dataset=[row_of(a, b) for a, b in rl_pairs],
        processing_class=tok,
        environment_factory=CalculatorEnv,
    )
    logs = [entry for entry in grpo.train().log_history if "reward" in entry]
    after = evaluate(grpo.policy, tok, held_out)
    print(
        f"after GRPO ({s['grpo_steps']} steps, {s['prompts']} questions x {NUM_GENERATIONS}): held-out accuracy "
        f"{after['accuracy']:.1%}, tool use {after['tool_use']:.1%}   (train reward {logs[0]['reward']:.2f} -> "
        f"{logs[-1]['reward']:.2f}; {time.time() - start:.0f} s)"
    )
    return {"before": before, "after": after}


if __name__ == "__main__":
    cli = parse_command_line(__doc__, "a smoke run: a few steps of each stage")
    main("quick" if cli.quick else "full", cli.seed, cli.output_dir)
