"""Small text games that follow the environment protocol (gym-style `reset`/`step` with text observations), for
the examples, the tests and `rlhf-ext train ppo --env rlhf_ext.environments.games:GuessNumberEnv`.

Nothing here depends on torch or on the trainers: any RL code that speaks gym can play these games (the
tabular Q-learning agent in examples/q_learning.py does).
"""

import random
import re
from typing import Optional

_NUMBER = re.compile(r"-?\d+")


class GuessNumberEnv:
    """Guess a hidden integer in [low, high] with higher/lower feedback.

    Observations are short plain strings that state what is still possible, so the observation alone is a
    Markov state: "guess 1 to 8 :" first, then e.g. "higher 5 to 8 :" or "lower 1 to 3 :". The action is
    any text whose first integer is the guess ("4", " 4", "I say 4").

    Rewards (per turn shaping + final reward):
      - a correct guess: `success_reward` (1.0) and the episode terminates;
      - every wrong guess: `step_cost` (-0.1), so fewer turns means more return;
      - a guess outside what is still possible (already ruled out, out of range) or no number at all:
        `wasted_cost` (-0.1) on top, since it gains no information.
    After `max_guesses` wrong guesses the episode is truncated (a time limit, as in gymnasium).
    `reset(seed=...)` draws the target from a `random.Random(seed)`; `options={"target": n}` (e.g. a dataset
    row) fixes it instead.
    """

    def __init__(
        self,
        low: int = 1,
        high: int = 8,
        max_guesses: int = 4,
        success_reward: float = 1.0,
        step_cost: float = -0.1,
        wasted_cost: float = -0.1,
    ):
        if not isinstance(low, int) or not isinstance(high, int) or low >= high:
            raise ValueError(f"low, high: expected integers with low < high, got low={low!r}, high={high!r}")
        if not isinstance(max_guesses, int) or max_guesses < 1:
            raise ValueError(f"max_guesses: expected a positive integer, got {max_guesses!r}")
        self.low, self.high, self.max_guesses = low, high, max_guesses
        self.success_reward, self.step_cost, self.wasted_cost = success_reward, step_cost, wasted_cost
        self._rng = random.Random()
        self.target: Optional[int] = None

    @property
    def actions(self) -> list:
        """Every sensible action, as text: what a tabular agent chooses from."""
        return [str(n) for n in range(self.low, self.high + 1)]

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        if seed is not None:
            self._rng = random.Random(seed)
        target = (options or {}).get("target")
        if target is None:
            target = self._rng.randint(self.low, self.high)
        elif not isinstance(target, int) or not self.low <= target <= self.high:
            raise ValueError(f"options['target']: expected an integer in [{self.low}, {self.high}], got {target!r}")
        self.target = target
        self.lo, self.hi = self.low, self.high  # what is still possible
        self.guesses = 0
        return f"guess {self.lo} to {self.hi} :", {"target": target}

    def step(self, action: str):
        if self.target is None:
            raise RuntimeError("GuessNumberEnv.step: call reset() first")
        if not isinstance(action, str):
            raise TypeError(f"action: expected a str, got {type(action).__name__}")
        self.guesses += 1
        match = _NUMBER.search(action)
        guess = int(match.group()) if match else None
        info = {"target": self.target, "guess": guess, "success": False}
        if guess == self.target:
            info["success"] = True
            return "correct", self.success_reward, True, False, info
        reward = self.step_cost
        if guess is None or not self.lo <= guess <= self.hi:
            reward += self.wasted_cost
            word = "say a number"
        elif guess < self.target:
            self.lo, word = guess + 1, "higher"
        else:
            self.hi, word = guess - 1, "lower"
        truncated = self.guesses >= self.max_guesses
        return f"{word} {self.lo} to {self.hi} :", reward, False, truncated, info


def play(env, policy, seed: int, max_steps: int = 100) -> dict:
    """One episode of `policy(observation) -> action` on `env`: {"return", "turns", "success"}."""
    observation, _ = env.reset(seed=seed)
    total, turns, info = 0.0, 0, {}
    for _ in range(max_steps):
        observation, reward, terminated, truncated, info = env.step(policy(observation))
        total += reward
        turns += 1
        if terminated or truncated:
            break
    return {"return": total, "turns": turns, "success": bool(info.get("success", False))}
