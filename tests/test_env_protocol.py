"""The environment protocol's checks (clear errors naming the environment and turn), observation rendering and
`load_env_factory`."""

import copy
import math

import numpy as np
import pytest

from rlhf_ext.environments.protocol import (
    EnvironmentStepError,
    check_reset,
    check_step,
    end_of_turn_token,
    load_env_factory,
    render_observation,
)
from rlhf_ext.environments.testing import CountingEnv


def test_check_step_accepts_the_protocol_and_numpy_scalars():
    env = CountingEnv()
    assert check_step(env, 1, ("obs", 1, False, True, {})) == ("obs", 1.0, False, True, {})
    messages = [{"role": "tool", "content": "4"}]
    out = check_step(env, 2, (messages, np.float32(0.5), np.bool_(True), False, {"k": 1}))
    assert out == (messages, 0.5, True, False, {"k": 1}) and type(out[1]) is float and type(out[2]) is bool


@pytest.mark.parametrize(
    "out, fragment",
    [
        (("obs", math.nan, False, False, {}), "reward: expected a finite number"),
        (("obs", math.inf, False, False, {}), "reward: expected a finite number"),
        (("obs", "1.0", False, False, {}), "reward: expected a real number, got str"),
        (("obs", True, False, False, {}), "reward: expected a real number, got bool"),
        (("obs", 1.0, 1, False, {}), "terminated: expected a bool, got int"),
        (("obs", 1.0, False, None, {}), "truncated: expected a bool, got NoneType"),
        (("obs", 1.0, False, False, []), "info: expected a dict, got list"),
        ((42, 1.0, False, False, {}), "observation: expected a str or a non-empty list of chat messages"),
        (([{"role": "user"}], 1.0, False, False, {}), "observation: expected a str"),
        (("obs", 1.0, False, False), "expected a tuple (observation, reward, terminated, truncated, info)"),
    ],
)
def test_check_step_names_environment_turn_and_problem(out, fragment):
    with pytest.raises(EnvironmentStepError) as caught:
        check_step(CountingEnv(), 3, out)
    message = str(caught.value)
    assert message.startswith("environment CountingEnv: step() at turn 3: ") and fragment in message
    assert caught.value.env_name == "CountingEnv" and caught.value.turn == 3


def test_check_reset():
    env = CountingEnv()
    assert check_reset(env, ("hello", {"a": 1})) == ("hello", {"a": 1})
    for bad, fragment in (
        ("hello", "expected a tuple (observation, info)"),
        (("hello", None), "info: expected a dict"),
        (([], {}), "observation: expected a str or a non-empty list"),
    ):
        with pytest.raises(EnvironmentStepError, match="environment CountingEnv: reset\\(\\): ") as caught:
            check_reset(env, bad)
        assert fragment in str(caught.value)


def test_render_text_observations(tiny_tokenizer):
    first = render_observation(tiny_tokenizer, "count up", None, first=True)
    assert first == tiny_tokenizer("count up")["input_ids"]
    later = render_observation(tiny_tokenizer, " then more", None, first=False)
    assert later == tiny_tokenizer(" then more", add_special_tokens=False)["input_ids"]
    assert render_observation(tiny_tokenizer, "", None, first=False) == []


def test_render_chat_observations_continue_the_conversation(tiny_tokenizer):
    """The first render plus each continuation equals the chat template's rendering of the whole conversation."""
    tok = tiny_tokenizer
    prompt = [{"role": "system", "content": "play"}, {"role": "user", "content": "count up"}]
    history = list(prompt)
    ids = render_observation(tok, prompt, None, first=True)
    reply = tok("the film", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids += reply
    history.append({"role": "assistant", "content": "the film"})
    observation = [{"role": "user", "content": "then more"}]
    ids += render_observation(tok, observation, history, first=False)
    history += observation
    whole = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids == list(whole["input_ids"])
    assert render_observation(tok, [], history, first=False) == []


def test_render_refuses_a_template_that_rewrites_history(tiny_tokenizer):
    rewriting = copy.deepcopy(tiny_tokenizer)  # a template that renders only the last message
    rewriting.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="does not render a conversation as a prefix"):
        render_observation(rewriting, [{"role": "user", "content": "c"}], history, first=False)


def test_render_chat_without_template(tiny_tokenizer):
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="tokenizer: the environment returns chat messages but .* no chat_template"):
        render_observation(plain, [{"role": "user", "content": "a"}], None, first=True)


def test_load_env_factory():
    assert load_env_factory("rlhf_ext.environments.testing:CountingEnv") is CountingEnv
    for spec, fragment in (
        ("rlhf_ext.environments.testing", "expected 'package.module:Factory'"),
        ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
        ("rlhf_ext.environments.testing:Nope", "has no attribute 'Nope'"),
        ("rlhf_ext.environments.testing:FAULTS", "is a tuple, expected a callable"),
    ):
        with pytest.raises(ValueError, match="^env: ") as caught:
            load_env_factory(spec)
        assert fragment in str(caught.value)


def test_end_of_turn_token(tiny_tokenizer):
    assert end_of_turn_token(tiny_tokenizer) == tiny_tokenizer.eos_token_id  # the tiny template closes turns with </s>
    closing = copy.deepcopy(tiny_tokenizer)
    closing.chat_template = tiny_tokenizer.chat_template.replace("</s>{% endfor %}", "<|system|>{% endfor %}")
    assert end_of_turn_token(closing) == closing.convert_tokens_to_ids("<|system|>")
    plain_newline = copy.deepcopy(tiny_tokenizer)
    plain_newline.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    assert end_of_turn_token(plain_newline) is None  # not a special token
    refusing = copy.deepcopy(tiny_tokenizer)
    refusing.chat_template = "{{ raise_exception('a system message first') }}"
    assert end_of_turn_token(refusing) is None
