"""Tiny environments for tests and smoke runs: `CountingEnv` (deterministic) and `VowelEnv` (learnable).

In CountingEnv step t (1-based) pays reward t, so where each reward lands in the token layout is checkable;
observations have lengths that vary with the seed and the turn, so a batch of episodes is ragged; `fault` makes
one step break the protocol in a chosen way, for the error-handling paths.
"""

from typing import Optional

FAULTS = ("raise", "nan", "wrong_type", "bad_observation")


class CountingEnv:
    """Terminates after `length` steps (`options={"length": n}` overrides it per episode); reward of step t is
    t. chat=True: observations are chat messages; empty_observations=True: steps return "" (no new tokens).
    fault in FAULTS breaks step `fault_turn`."""

    def __init__(
        self,
        length: int = 3,
        *,
        chat: bool = False,
        empty_observations: bool = False,
        fault: Optional[str] = None,
        fault_turn: int = 2,
    ):
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault: expected one of {FAULTS} or None, got {fault!r}")
        self.length, self.chat, self.empty_observations = length, chat, empty_observations
        self.fault, self.fault_turn = fault, fault_turn
        self.turn, self.seed, self.actions = 0, 0, []

    def _observation(self, text: str):
        return [{"role": "user", "content": text}] if self.chat else text

    def reset(self, *, seed=None, options=None):
        self.turn, self.seed, self.actions = 0, seed or 0, []
        if options and "length" in options:
            self.length = int(options["length"])
        return self._observation("count" + " up" * (self.seed % 3)), {"seed": seed}

    def step(self, action: str):
        self.turn += 1
        self.actions.append(action)
        if self.fault is not None and self.turn == self.fault_turn:
            if self.fault == "raise":
                raise KeyError("the counter broke")
            if self.fault == "nan":
                return self._observation(" nan"), float("nan"), False, False, {}
            if self.fault == "wrong_type":
                return self._observation(" oops"), "one", False, False, {}
            return 42, 0.0, False, False, {}
        terminated = self.turn >= self.length
        text = "" if self.empty_observations else " then" + " more" * ((self.seed + self.turn) % 3)
        info = {"success": terminated and self.seed % 2 == 0}
        return self._observation(text), float(self.turn), terminated, False, info


class VowelEnv:
    """A learnable environment: `turns` steps, each paying the fraction of the action's characters that are
    vowels (a dense signal a tiny random policy can raise within a few updates, whatever its tokenizer)."""

    def __init__(self, turns: int = 2):
        self.turns, self.turn = turns, 0

    def reset(self, *, seed=None, options=None):
        self.turn = 0
        return "the film", {}

    def step(self, action: str):
        self.turn += 1
        reward = sum(c in "aeiou" for c in action) / max(len(action), 1)
        return " then", reward, self.turn >= self.turns, False, {}
