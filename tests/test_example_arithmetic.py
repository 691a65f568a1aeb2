"""The arithmetic GRPO example in its quick mode: SFT -> GRPO with the rule reward -> held-out accuracy, end to
end (the full run, `python examples/arithmetic_grpo.py`, is what shows the gain)."""

import pytest

from tests.example_helpers import load_example

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rule_reward_checks_the_sum():
    example = load_example("arithmetic_grpo.py")
    prompts = [example.prompt_of(7, 18), example.prompt_of(30, 49)]
    assert prompts[0] == "0 7 + 1 8 ="
    assert example.correct_sum(prompts, ["2 5", "7 8"]) == [1.0, 0.0]
    assert example.correct_sum(prompts, ["25", " 7 9"]) == [1.0, 1.0]
    sft, rl, held_out = example.problems(0)
    assert not (set(sft) & set(held_out)) and not (set(rl) & set(held_out)) and not (set(sft) & set(rl))


def test_quick_run_end_to_end(tmp_path, capsys):
    result = load_example("arithmetic_grpo.py").main("quick", seed=0, output_dir=str(tmp_path))
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    out = capsys.readouterr().out
    assert "after SFT" in out and "after GRPO" in out
