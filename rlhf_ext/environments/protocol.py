"""The environment protocol: gym-style `reset()` / `step(action)` over text, and how observations become tokens.

```python
class MyEnv:                                  # a gymnasium.Env subclass works as it is
    def reset(self, *, seed=None, options=None) -> tuple[Observation, dict]: ...
    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict]: ...
    #                      observation, reward, terminated, truncated, info
```
An Observation is a str (appended as plain text) or a list of chat messages ({"role": ..., "content": str})
rendered with the tokenizer's chat template as a continuation of the conversation. An environment may expose
`tool_schemas` (JSON-schema dicts, the `tools=` argument of `apply_chat_template`), used for the first render.

`check_reset` / `check_step` validate what an environment returned, raising `EnvironmentStepError` whose
message names the environment class and the turn, so one faulty episode can be reported and ended while the
rest of the batch carries on.
"""

import importlib
import math
import numbers
from typing import Optional, Union

Observation = Union[str, list]


class EnvironmentStepError(RuntimeError):
    """An environment raised, or returned something outside the protocol, in `reset` (turn 0) or `step`."""

    def __init__(self, env, turn: int, problem: str):
        self.env_name = type(env).__name__
        self.turn = turn
        self.problem = problem
        where = "reset()" if turn == 0 else f"step() at turn {turn}"
        super().__init__(f"environment {self.env_name}: {where}: {problem}")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value
    )


def _check_observation(env, turn: int, observation, *, allow_empty: bool):
    if isinstance(observation, str) or (_is_messages(observation) and (allow_empty or observation)):
        return observation
    raise EnvironmentStepError(
        env,
        turn,
        "observation: expected a str or a non-empty list of chat messages ({'role': ..., 'content': str}), "
        f"got {type(observation).__name__} {str(observation)[:80]!r}",
    )


def check_reset(env, out) -> tuple[Observation, dict]:
    """(observation, info) from `env.reset(...)`'s return value `out`, or EnvironmentStepError (turn 0)."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise EnvironmentStepError(
            env, 0, f"expected a tuple (observation, info), got {type(out).__name__} {str(out)[:80]!r}"
        )
    observation, info = out
    if not isinstance(info, dict):
        raise EnvironmentStepError(env, 0, f"info: expected a dict, got {type(info).__name__}")
    return _check_observation(env, 0, observation, allow_empty=False), info


def check_step(env, turn: int, out) -> tuple[Observation, float, bool, bool, dict]:
    """(observation, reward, terminated, truncated, info) from `env.step(...)`'s return value `out` at turn
    `turn` (1-based), or EnvironmentStepError. The reward must be a finite real number; numpy scalars and
    0-dim tensors count (converted to float), as do numpy bools for the flags."""
    if not isinstance(out, tuple) or len(out) != 5:
        raise EnvironmentStepError(
            env,
            turn,
            "expected a tuple (observation, reward, terminated, truncated, info), "
            f"got {type(out).__name__} {str(out)[:80]!r}",
        )
    observation, reward, terminated, truncated, info = out
    observation = _check_observation(env, turn, observation, allow_empty=True)
    if hasattr(reward, "item") and getattr(reward, "ndim", 0) == 0:
        reward = reward.item()
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
        raise EnvironmentStepError(env, turn, f"reward: expected a real number, got {type(reward).__name__}")
    if not math.isfinite(float(reward)):
        raise EnvironmentStepError(env, turn, f"reward: expected a finite number, got {reward!r}")
    flags = []
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if type(flag).__name__ not in ("bool", "bool_"):
            raise EnvironmentStepError(env, turn, f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
        flags.append(bool(flag))
    if not isinstance(info, dict):
        raise EnvironmentStepError(env, turn, f"info: expected a dict, got {type(info).__name__}")
    return observation, float(reward), flags[0], flags[1], info


def _chat_text(tokenizer, messages: list, add_generation_prompt: bool, tools) -> str:
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **extra
    )


def render_observation(
    tokenizer, observation: Observation, history: Optional[list], *, first: bool, tools: Optional[list] = None
) -> list:
    """Token ids appended to an episode for `observation`.

    A str: its plain-text tokens (the first observation with the tokenizer's special tokens, e.g. BOS, as
    trainer prompts get them; later ones without). A list of messages: rendered with the chat template; the
    first observation is the whole prompt with the generation prompt, a later one only the tokens the new
    messages add after `history` (the conversation so far, the agent's replies included as assistant
    messages), followed by the generation prompt. `tools` (JSON schemas) go to the template on the first
    render. The agent's own tokens are never re-tokenised: only the observation's text is.
    """
    if isinstance(observation, str):
        return list(tokenizer(observation, add_special_tokens=first)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer: the environment returns chat messages but the tokenizer has no chat_template")
    if first:
        text = _chat_text(tokenizer, observation, True, tools)
    else:
        if not observation:
            return []
        before = _chat_text(tokenizer, history, False, tools)
        after = _chat_text(tokenizer, [*history, *observation], True, tools)
        if not after.startswith(before):
            raise ValueError(
                "tokenizer: its chat template does not render a conversation as a prefix of the conversation "
                "continued (it rewrites earlier turns), so an observation cannot be appended as new tokens; "
                "use an environment returning str observations, or a template that only appends"
            )
        text = after[len(before) :]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_token(tokenizer) -> Optional[int]:
    """The special token the chat template closes an assistant message with (Qwen's <|im_end|>, Llama 3's
    <|eot_id|>), found by rendering a one-exchange conversation; None when there is no template, it fails on that
    conversation, or what follows the assistant's text is not a special token. The agent's turn ends there."""
    marker = "\x1fturn\x1f"
    try:
        text = _chat_text(
            tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}], False, None
        )
    except Exception:  # templates may insist on other conversations (a system turn first, ...): no token then
        return None
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else None


def load_env_factory(spec: str):
    """The callable named by `spec` ("package.module:Factory"), as `rlhf-ext train ... --env` takes it."""
    module_name, sep, attribute = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attribute:
        raise ValueError(f"env: expected 'package.module:Factory', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(f"env: cannot import module {module_name!r} of {spec!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"env: module {module_name!r} has no attribute {attribute!r} (from {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"env: {spec!r} is a {type(target).__name__}, expected a callable returning an environment")
    return target
