"""The environment examples: guess-the-number with PPO and GRPO (env_factory), and the calculator tool
environment in TRL's form (environment_factory) after SFT. Quick modes end to end; the full runs are what show
the gains (figures in the README)."""

import pytest

from rlhf_ext.environments.tools import as_environment_factory
from tests.example_helpers import load_example

pytestmark = pytest.mark.usefixtures("single_thread")


def test_guess_number_quick_run_with_ppo_and_grpo(tmp_path, capsys):
    results = load_example("guess_number_rl.py").main("quick", ("ppo", "grpo"), seed=0, output_dir=str(tmp_path))
    for algorithm in ("ppo", "grpo"):
        for stage in ("before", "after"):
            figures = results[algorithm][stage]
            assert 0.0 <= figures["success"] <= 1.0 and 1.0 <= figures["turns"] <= 4.0
    out = capsys.readouterr().out
    assert "PPO (1 steps" in out and "GRPO (1 steps" in out and "held-out success" in out


def test_calculator_conversation_matches_what_the_adapter_parses():
    example = load_example("calculator_tools.py")
    tok, _ = example.build_tokenizer_and_model(0)
    env = as_environment_factory(example.CalculatorEnv)()
    messages, _ = env.reset(options=example.row_of(23, 47))
    assert messages == [{"role": "user", "content": "compute 23 * 47"}]
    rendered = tok.apply_chat_template(messages, tools=env.tool_schemas, tokenize=False, add_generation_prompt=True)
    tools_text = rendered.split("</s>")[0].removeprefix("<|system|>")
    assert tools_text == "tools: multiply(a, b): Multiply two integers.;"
    sft = tok.apply_chat_template(example.conversation(23, 47, tools_text), tokenize=False)
    assert sft.startswith(rendered)  # the SFT text continues exactly the prompt the rollout renders
    call = sft[len(rendered) :].split("</s>")[0]
    observation, reward, terminated, _, info = env.step(call)
    assert observation == [{"role": "tool", "name": "multiply", "content": "1081"}] and not terminated
    assert env.environment.calls == [(23, 47)]
    assert env.step("answer:1081")[2] is True
    assert example.correct_answer(["<tool_call>..</tool_call>1081answer:1081", "answer:12", ""], [1081, 1081, 5]) == [
        1.0,
        0.0,
        0.0,
    ]


def test_calculator_quick_run_sft_then_grpo(tmp_path, capsys):
    result = load_example("calculator_tools.py").main("quick", seed=0, output_dir=str(tmp_path))
    for stage in ("before", "after"):
        assert 0.0 <= result[stage]["accuracy"] <= 1.0 and 0.0 <= result[stage]["tool_use"] <= 1.0
    out = capsys.readouterr().out
    assert "after SFT" in out and "after GRPO" in out
