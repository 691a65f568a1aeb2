"""TRL's tool form of environments, as an adapter onto the gym protocol.

`GRPOTrainer(..., environment_factory=Cls, tools=[fn, ...])` follows TRL's semantics:
  - `environment_factory` is a class (or any zero-argument callable); one instance per episode. Its public
    methods (not `reset`, not `_`-prefixed) are tools, described to the model by their type hints and
    Google-style docstrings (`Args:` section), as `transformers.utils.get_json_schema` reads them.
  - `reset(**row)` is called with the dataset row's columns before the episode; a str it returns is appended to
    the last user message of the prompt.
  - `tools` are plain functions, stateless, described the same way.
  - the model calls a tool by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the chat
    template's format, see rlhf_ext.models.tiny.TOOL_CHAT_TEMPLATE); each result comes back as a message of role
    "tool"; a turn without a tool call is the answer and ends the episode.
  - reward functions score the episode and receive `environments=` (the instances, one per completion), so they
    can read what the episode did to its environment.

`as_environment_factory(environment_factory, tools)` returns a factory of `ToolEnvironment`s, each a gym-protocol
environment the multi-turn rollout runs like any other: reset -> the prompt as chat messages (plus
`tool_schemas`), step(text) -> tool messages. A malformed call, an unknown tool or a tool that raises becomes an
error message of role "tool" the model sees on its next turn, never a crash of the run.
"""

import copy
import inspect
import json
import re
from collections.abc import Callable
from typing import Optional

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPEN_TAG = "<tool_call>"


def tool_schema(function: Callable, owner: str = "tools") -> dict:
    """The JSON schema of `function` ({"type": "function", "function": {name, description, parameters}}), or a
    ValueError naming `owner` and the function when its hints or docstring cannot describe it."""
    from transformers.utils import get_json_schema

    name = getattr(function, "__name__", repr(function))
    try:
        return get_json_schema(function)
    except Exception as error:  # transformers raises its own exception types for missing hints/docstrings
        raise ValueError(
            f"{owner}: {name!r} cannot be described as a tool ({error}); a tool needs type hints on every "
            "argument and a Google-style docstring with a description and an 'Args:' entry per argument"
        ) from None


def environment_tools(instance) -> dict:
    """{name: bound method} of the public methods of `instance` other than `reset` (TRL's rule)."""
    found = {}
    for name in dir(type(instance)):
        if name.startswith("_") or name == "reset":
            continue
        member = getattr(instance, name, None)
        if callable(member) and not isinstance(member, type):
            found[name] = member
    return found


def parse_tool_calls(text: str) -> tuple[list, list]:
    """([(name, arguments dict), ...], [error str, ...]) from the `<tool_call>` blocks of `text`, in order. A block
    that is not a JSON object with a str "name" and an object "arguments" (a JSON string holding one is accepted)
    gives an error instead; an opening tag without its closing tag too."""
    calls, errors = [], []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as error:
            errors.append(f"tool call {block.strip()[:80]!r} is not valid JSON ({error.msg})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            errors.append(f'tool call {block.strip()[:80]!r}: expected {{"name": str, "arguments": {{...}}}}')
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            errors.append(f"tool call {call['name']!r}: arguments must be a JSON object, got {arguments!r:.80}")
            continue
        calls.append((call["name"], arguments))
    if text.count(_OPEN_TAG) > len(_CALL.findall(text)):
        errors.append("a <tool_call> tag is not closed with </tool_call>")
    return calls, errors


def _accepted(function: Callable, row: dict) -> dict:
    """The columns of `row` that `function` takes: all of them when it has **kwargs (TRL's `reset(**kwargs)`)."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return row
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in row.items() if k in names}


def _as_text(result) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return str(result)


class ToolEnvironment:
    """One episode of TRL's tool form as a gym-protocol environment (see the module docstring).

    environment: the instance `environment_factory()` made (None with plain tools only); tools: plain functions.
    Step rewards are 0.0: in this form the reward functions score the whole episode.
    """

    def __init__(self, environment=None, tools: Optional[list] = None):
        self.environment = environment
        functions = {getattr(fn, "__name__", repr(fn)): fn for fn in tools or []}
        self.tools = environment_tools(environment) if environment is not None else {}  # name -> callable
        clash = sorted(set(functions) & set(self.tools))
        if clash:
            raise ValueError(
                f"tools: {clash[0]!r} is both a method of {type(environment).__name__} and a function in tools"
            )
        self.tools.update(functions)
        if not self.tools:
            owner = type(environment).__name__ if environment is not None else "tools"
            raise ValueError(f"environment_factory/tools: {owner} gives no tools (no public methods besides reset)")
        self._resets = callable(getattr(environment, "reset", None))
        self.tool_schemas = [tool_schema(fn, f"tools ({type(environment).__name__})") for fn in self.tools.values()]

    def reset(self, *, seed=None, options=None):
        row = dict(options or {})
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            messages = copy.deepcopy(prompt)
        else:
            raise ValueError(
                "options: TRL's tool form needs a dataset row with a 'prompt' (a str or a list of chat "
                f"messages), got {type(prompt).__name__} {prompt!r:.80}"
            )
        extra = self.environment.reset(**_accepted(self.environment.reset, row)) if self._resets else None
        if isinstance(extra, str) and extra:
            users = [m for m in messages if m.get("role") == "user"] or [messages[-1]]
            users[-1]["content"] = f"{users[-1]['content']}\n{extra}" if users[-1].get("content") else extra
        self.calls = 0
        return messages, {"tools": list(self.tools)}

    def step(self, action: str):
        if not isinstance(action, str):
            raise TypeError(f"action: expected a str, got {type(action).__name__}")
        if _OPEN_TAG not in action:  # an answer, not a call: the episode is over
            return [], 0.0, True, False, {"tool_calls": 0, "tool_errors": 0}
        calls, errors = parse_tool_calls(action)
        messages = [{"role": "tool", "content": f"error: {error}"} for error in errors]
        for name, arguments in calls:
            messages.append({"role": "tool", "name": name, "content": self._call(name, arguments)})
        self.calls += len(calls)
        failed = len(errors) + sum(m["content"].startswith("error:") for m in messages[len(errors) :])
        return messages, 0.0, False, False, {"tool_calls": len(calls), "tool_errors": failed}

    def _call(self, name: str, arguments: dict) -> str:
        if name not in self.tools:
            return f"error: unknown tool {name!r}; the tools are {', '.join(self.tools)}"
        try:
            return _as_text(self.tools[name](**arguments))
        except Exception as error:  # the model sees what went wrong, as TRL reports tool failures
            return f"error: {name} raised {type(error).__name__}: {error}"


def as_environment_factory(environment_factory: Optional[Callable] = None, tools: Optional[list] = None) -> Callable:
    """A zero-argument callable returning a fresh `ToolEnvironment` per episode, from TRL's `environment_factory`
    and/or `tools` arguments. Checked here, so a bad argument fails before any training."""
    if environment_factory is None and not tools:
        raise ValueError("environment_factory/tools: expected an environment class or a list of tool functions")
    if environment_factory is not None and not callable(environment_factory):
        raise TypeError(
            f"environment_factory: expected a class or zero-argument callable, got {type(environment_factory).__name__}"
        )
    tools = list(tools or [])
    for fn in tools:
        if not callable(fn):
            raise TypeError(f"tools: expected callables, got {type(fn).__name__} {fn!r:.60}")
        tool_schema(fn)

    def make():
        return ToolEnvironment(environment_factory() if environment_factory is not None else None, tools)

    make()  # an environment class without describable tools fails now, naming the method
    return make


def environments_of(envs) -> Optional[list]:
    """The `environments=` argument for reward functions: each episode's TRL instance, or None when no episode
    runs through the tool form."""
    envs = list(envs)
    if not any(isinstance(env, ToolEnvironment) for env in envs):
        return None
    return [env.environment if isinstance(env, ToolEnvironment) else env for env in envs]
