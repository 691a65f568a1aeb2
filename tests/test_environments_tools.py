"""TRL's tool form through the gym-protocol adapter: tool schemas from methods and docstrings, parsing of the chat
template's tool-call format (malformed calls become error observations, not crashes), a full reset/step episode,
and the Hermes-style template of the tiny tokenizer."""

import pytest

from rlhf_ext.environments.tools import (
    ToolEnvironment,
    as_environment_factory,
    environment_tools,
    environments_of,
    parse_tool_calls,
)


class Counter:
    """A stateful environment: its public methods are the tools."""

    def __init__(self):
        self.total = 0
        self.resets = []

    def reset(self, **row):
        self.total = row.get("start", 0)
        self.resets.append(row)
        return f"start at {self.total}"

    def add(self, amount: int) -> int:
        """Add to the running total.

        Args:
            amount: how much to add
        """
        self.total += amount
        return self.total

    def fail(self) -> str:
        """Always raises."""
        raise ValueError("broken on purpose")

    def _private(self):
        return "not a tool"


def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: what to upper-case
    """
    return text.upper()


def call(name, **arguments):
    import json

    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_public_methods_are_tools_and_docstrings_their_schemas():
    env = ToolEnvironment(Counter(), [shout])
    assert set(environment_tools(Counter())) == {"add", "fail"}
    schemas = {s["function"]["name"]: s["function"] for s in env.tool_schemas}
    assert set(schemas) == {"add", "fail", "shout"}
    assert schemas["add"]["description"] == "Add to the running total."
    assert schemas["add"]["parameters"]["properties"]["amount"] == {"type": "integer", "description": "how much to add"}
    assert schemas["add"]["parameters"]["required"] == ["amount"]
    assert schemas["shout"]["parameters"]["properties"]["text"]["type"] == "string"


def test_parse_good_and_malformed_calls():
    calls, errors = parse_tool_calls(f"let me see {call('add', amount=3)} and {call('shout', text='hi')}")
    assert calls == [("add", {"amount": 3}), ("shout", {"text": "hi"})] and errors == []
    calls, errors = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"amount\\": 2}"}</tool_call>')
    assert calls == [("add", {"amount": 2})] and errors == []  # arguments as a JSON string, as some models write
    calls, errors = parse_tool_calls("<tool_call>{add 3}</tool_call><tool_call>[1]</tool_call><tool_call>{")
    assert calls == []
    assert "not valid JSON" in errors[0] and '"name": str' in errors[1] and "not closed" in errors[2]
    calls, errors = parse_tool_calls('<tool_call>{"name": "add", "arguments": [1]}</tool_call>')
    assert calls == [] and "arguments must be a JSON object" in errors[0]


def test_full_episode_through_the_adapter():
    make = as_environment_factory(Counter, [shout])
    env = make()
    assert make() is not env and make().environment is not env.environment  # one instance per episode
    messages, info = env.reset(seed=0, options={"prompt": "count up", "start": 10})
    assert messages == [{"role": "user", "content": "count up\nstart at 10"}]
    assert env.environment.resets == [{"prompt": "count up", "start": 10}]
    assert info["tools"] == ["add", "fail", "shout"]
    observation, reward, terminated, truncated, info = env.step(call("add", amount=5) + call("shout", text="ok"))
    assert observation == [
        {"role": "tool", "name": "add", "content": "15"},
        {"role": "tool", "name": "shout", "content": "OK"},
    ]
    assert (reward, terminated, truncated, info["tool_calls"], info["tool_errors"]) == (0.0, False, False, 2, 0)
    observation, _, terminated, _, info = env.step(call("fail") + call("nope") + call("add", amount="x", extra=1))
    assert not terminated and info["tool_errors"] == 3
    assert observation[0]["content"] == "error: fail raised ValueError: broken on purpose"
    assert observation[1]["content"].startswith("error: unknown tool 'nope'; the tools are add, fail, shout")
    assert observation[2]["content"].startswith("error: add raised TypeError")
    observation, reward, terminated, truncated, info = env.step("<tool_call>{oops</tool_call>")
    assert not terminated and observation[0]["content"].startswith("error: tool call '{oops' is not valid JSON")
    assert env.step("the total is 15") == ([], 0.0, True, False, {"tool_calls": 0, "tool_errors": 0})
    assert env.environment.total == 15 and environments_of([env]) == [env.environment]


def test_tools_only_and_chat_prompts():
    env = as_environment_factory(tools=[shout])()
    assert env.environment is None
    prompt = [{"role": "system", "content": "be loud"}, {"role": "user", "content": "hi"}]
    messages, _ = env.reset(options={"prompt": prompt})
    assert messages == prompt and messages is not prompt
    assert env.step(call("shout", text="hi"))[0] == [{"role": "tool", "name": "shout", "content": "HI"}]
    assert environments_of([object()]) is None


def undocumented(x):
    return x


class NoTools:
    def reset(self):
        return None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "expected an environment class or a list of tool functions"),
        (dict(environment_factory=3), TypeError, "environment_factory: expected a class"),
        (dict(tools=[shout, "add"]), TypeError, "tools: expected callables, got str"),
        (dict(tools=[undocumented]), ValueError, "tools: 'undocumented' cannot be described as a tool"),
        (dict(environment_factory=NoTools), ValueError, "NoTools gives no tools"),
        (dict(environment_factory=Counter, tools=[Counter().add]), ValueError, "'add' is both a method of Counter"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        as_environment_factory(**kwargs)


def test_reset_without_a_prompt_is_a_clear_error():
    env = as_environment_factory(tools=[shout])()
    with pytest.raises(ValueError, match="options: TRL's tool form needs a dataset row with a 'prompt'"):
        env.reset(options={"question": "?"})
    with pytest.raises(TypeError, match="action: expected a str, got int"):
        env.step(3)


def test_tiny_tool_template_renders_calls_and_results_and_keeps_the_old_template():
    from rlhf_ext.models.tiny import CHAT_TEMPLATE, build_tokenizer

    env = as_environment_factory(Counter)()
    tok = build_tokenizer(tool_calls=True)
    messages, _ = env.reset(options={"prompt": "count"})
    first = tok.apply_chat_template(messages, tools=env.tool_schemas, tokenize=False, add_generation_prompt=True)
    assert first == (
        "<|system|>tools: add(amount): Add to the running total.; fail(): Always raises.;</s>"
        "<|user|>count\nstart at 0</s><|assistant|>"
    )
    reply = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"amount": 2}}}],
    }
    text = tok.apply_chat_template([*messages, reply], tokenize=False)
    action = text.split("<|assistant|>")[1].removesuffix("</s>")
    assert action == '<tool_call>{"name": "add", "arguments": {"amount": 2}}</tool_call>'
    assert env.step(action)[0] == [{"role": "tool", "name": "add", "content": "2"}]  # what it renders, it parses
    assert tok.apply_chat_template([{"role": "tool", "content": "2"}], tokenize=False) == "<|tool|>2</s>"
    assert tok.decode(tok(action)["input_ids"], skip_special_tokens=True) == action  # tags survive decoding
    old = build_tokenizer()
    assert old.chat_template == CHAT_TEMPLATE and "<|tool|>" not in old.get_vocab()
    assert tok.convert_tokens_to_ids("<|assistant|>") == old.convert_tokens_to_ids("<|assistant|>")


@pytest.mark.usefixtures("single_thread")
def test_grpo_with_environment_factory_gives_reward_functions_the_environments(make_lm, tiny_tokenizer, cpu_args):
    from rlhf_ext import GRPOTrainer
    from tests.trainer_helpers import grpo_args

    seen = []

    def reward(prompts, completions, start, environments, **kwargs):
        seen.append((list(start), list(environments)))
        return [float(env.total) for env in environments]

    rows = [{"prompt": "count up", "start": i} for i in range(8)]
    args = grpo_args(cpu_args, max_steps=1, max_turns=2, max_completion_length=4)
    trainer = GRPOTrainer(make_lm(), [reward], args=args, train_dataset=rows, processing_class=tiny_tokenizer,
                          environment_factory=Counter)  # fmt: skip
    trainer.train()
    starts, environments = seen[0]
    assert len(environments) == len(starts) == args.per_device_train_batch_size
    assert all(isinstance(env, Counter) for env in environments)
    assert len({id(env) for env in environments}) == len(environments)  # one instance per episode
    assert [env.resets[0]["start"] for env in environments] == starts  # reset(**row) got each episode's row
