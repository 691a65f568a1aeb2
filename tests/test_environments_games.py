"""The guess-the-number text game follows the gym protocol (types, rewards, termination vs truncation, seeding),
and the textbook Q-learning agent of examples/q_learning.py learns it through that protocol alone."""

import math

import pytest

from rlhf_ext.environments.games import GuessNumberEnv, play
from tests.example_helpers import load_example


def test_reset_and_step_return_the_gym_tuples():
    env = GuessNumberEnv(low=1, high=8, max_guesses=4)
    observation, info = env.reset(seed=3)
    assert observation == "guess 1 to 8 :" and isinstance(info, dict)
    target = info["target"]
    out = env.step("0")  # out of range: wasted
    assert len(out) == 5
    observation, reward, terminated, truncated, info = out
    assert isinstance(observation, str) and isinstance(reward, float) and math.isfinite(reward)
    assert (terminated, truncated) == (False, False) and observation == "say a number 1 to 8 :"
    assert reward == pytest.approx(-0.2)
    observation, reward, terminated, truncated, info = env.step(f" {target}")
    assert (observation, reward, terminated, truncated, info["success"]) == ("correct", 1.0, True, False, True)


def test_feedback_narrows_the_interval_and_shapes_the_reward():
    env = GuessNumberEnv(low=1, high=8, max_guesses=4)
    env.reset(options={"target": 6})
    assert env.step("I say 4")[:2] == ("higher 5 to 8 :", pytest.approx(-0.1))
    assert env.step("7")[:2] == ("lower 5 to 6 :", pytest.approx(-0.1))
    assert env.step("2")[:2] == ("say a number 5 to 6 :", pytest.approx(-0.2))  # already ruled out
    observation, reward, terminated, truncated, info = env.step("no idea")
    assert (terminated, truncated, info["success"], info["guess"]) == (False, True, False, None)


def test_same_seed_same_target_and_episode():
    targets = [GuessNumberEnv(high=100).reset(seed=s)[1]["target"] for s in (5, 5, 6)]
    assert targets[0] == targets[1]
    env = GuessNumberEnv()
    runs = [play(env, lambda obs: obs.split()[-2], seed=11) for _ in range(2)]  # always guess the top
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(low=5, high=5), "low, high"),
        (dict(max_guesses=0), "max_guesses"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuessNumberEnv(**kwargs)


def test_bad_target_and_action_are_clear_errors():
    env = GuessNumberEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("3")
    with pytest.raises(ValueError, match=r"options\['target'\].*\[1, 8\].*42"):
        env.reset(options={"target": 42})
    env.reset(seed=0)
    with pytest.raises(TypeError, match="action: expected a str, got int"):
        env.step(3)


def test_q_learning_learns_the_game_from_the_protocol(capsys):
    result = load_example("q_learning.py").main("quick", seed=0)
    before, after = result["before"], result["after"]
    # an untrained (random) greedy policy wins about 40% of games; the learned table wins nearly all, faster
    assert before["success"] < 0.6
    assert after["success"] >= 0.8 and after["success"] > before["success"] + 0.3
    assert after["turns"] < before["turns"]
    assert "held-out success" in capsys.readouterr().out
