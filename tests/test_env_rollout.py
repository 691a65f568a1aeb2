"""The batched multi-turn engine (`run_episodes`): agent vs environment token masks, reward placement, log-prob
equality with a full forward over the whole episode, error handling, seeding, truncation and batching (one
engine call per turn, model forwards independent of the number of episodes)."""

import copy
import logging

import pytest
import torch

from rlhf_ext.environments import rollout as env_rollout
from rlhf_ext.environments.protocol import EnvironmentStepError, render_observation
from rlhf_ext.environments.rollout import run_episodes
from rlhf_ext.environments.testing import CountingEnv
from rlhf_ext.generation import SamplingSettings
from rlhf_ext.models.logprobs import sequence_logprobs
from tests.trainer_helpers import eos_biased

pytestmark = pytest.mark.usefixtures("single_thread")


def settings_for(tokenizer, **overrides):
    return SamplingSettings(**{"max_new_tokens": 5, "pad_token_id": tokenizer.pad_token_id, **overrides})


def play(model, tokenizer, envs, seed=0, lengths=None, **kwargs):
    kwargs.setdefault("max_turns", 4)
    settings = kwargs.pop("settings", None) or settings_for(tokenizer)
    return run_episodes(
        model,
        tokenizer,
        envs,
        settings,
        seeds=list(range(len(envs))),
        options=None if lengths is None else [{"length": n} for n in lengths],
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def segments(mask_row):
    """[(start, end)] runs of 1s in a 1-d 0/1 tensor."""
    runs, start = [], None
    for t, on in enumerate(mask_row.tolist() + [0]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            runs.append((start, t))
            start = None
    return runs


@pytest.mark.parametrize("chat, eos_bias", [(False, 0.0), (True, 0.0), (False, 3.0), (True, 3.0)])
def test_masks_separate_agent_and_environment_tokens(make_lm, tiny_tokenizer, chat, eos_bias):
    """eos_bias > 0: turns of different lengths ending on the stop token; 0: turns cut at max_new_tokens."""
    tok = tiny_tokenizer
    model = eos_biased(make_lm(), tok, eos_bias).eval()
    batch = play(model, tok, [CountingEnv(3, chat=chat) for _ in range(4)], lengths=[1, 2, 3, 3])
    ends = [
        batch.sequences[b, batch.prompt_length + end - 1] for b in range(4) for _, end in segments(batch.agent_mask[b])
    ]
    assert (tok.eos_token_id in ends) == (eos_bias > 0)
    P = batch.prompt_length
    for b, env in enumerate(batch.envs):
        tokens = batch.sequences[b, P:]
        real = batch.episode_mask[b].bool()
        agent = batch.agent_mask[b].bool()
        assert not bool((agent & ~real).any())  # agent tokens are real tokens
        assert bool(real[: int(real.sum())].all())  # packed: no holes inside an episode
        turns = segments(batch.agent_mask[b])
        assert len(turns) == int(batch.turns[b]) == env.length == len(batch.actions[b])
        for (start, end), action in zip(turns, batch.actions[b]):
            ids = tokens[start:end].tolist()
            ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids  # the stop token is not part of the action
            assert tok.decode(ids, skip_special_tokens=False) == action
        assert env.actions == batch.actions[b]  # the environment saw exactly the decoded turn
        # The environment tokens between turns are exactly the rendered observations (none after the last step).
        history = [{"role": "user", "content": "count" + " up" * (b % 3)}] if chat else None
        for k, ((_, end), (next_start, _)) in enumerate(zip(turns, turns[1:]), start=1):
            text = " then" + " more" * ((b + k) % 3)
            observation = [{"role": "user", "content": text}] if chat else text
            if chat:
                history.append({"role": "assistant", "content": batch.actions[b][k - 1]})
            expected = render_observation(tok, observation, history, first=False)
            if chat:
                history.extend(observation)
            assert tokens[end:next_start].tolist() == expected
            assert not bool(agent[end:next_start].any())
        assert int(real.sum()) == turns[-1][1]
        assert float(batch.logprobs[b][~agent].abs().sum()) == 0.0


def test_rewards_sit_on_the_last_agent_token_of_their_turn(make_lm, tiny_tokenizer):
    batch = play(make_lm().eval(), tiny_tokenizer, [CountingEnv(3) for _ in range(3)], lengths=[3, 1, 2])
    for b in range(3):
        turns = segments(batch.agent_mask[b])
        expected = torch.zeros_like(batch.turn_rewards[b])
        for k, (_, end) in enumerate(turns, start=1):
            expected[end - 1] = float(k)  # CountingEnv pays k at step k
        assert torch.equal(batch.turn_rewards[b], expected)
        assert float(batch.final_reward[b]) == float(len(turns)) == float(batch.returns[b]) - sum(range(1, len(turns)))
    assert batch.terminated.all() and not batch.truncated.any()
    assert batch.success.tolist() == [True, False, True]  # CountingEnv: success on even seeds


@pytest.mark.parametrize(
    "arch, chat, empty, temperature, eos_bias",
    [
        ("llama", False, False, 1.0, 0.0),
        ("qwen2", True, False, 0.7, 3.0),
        ("gpt2", False, True, 1.3, 0.0),
        ("llama", True, True, 1.0, 3.0),
    ],
)
def test_rollout_logprobs_equal_a_full_forward_over_the_episode(
    make_lm, tiny_tokenizer, arch, chat, empty, temperature, eos_bias
):
    """Ragged observations, ragged turns (eos_bias), finished rows feeding holes, empty observations: the log-probs
    recorded while sampling over the holey cache equal one forward over the packed episodes."""
    model = eos_biased(make_lm(arch), tiny_tokenizer, eos_bias).eval()
    envs = [CountingEnv(3, chat=chat, empty_observations=empty) for _ in range(5)]
    settings = settings_for(tiny_tokenizer, temperature=temperature)
    batch = play(model, tiny_tokenizer, envs, lengths=[3, 1, 2, 3, 2], settings=settings)
    with torch.no_grad():
        logprobs = sequence_logprobs(
            model, batch.sequences, batch.attention_mask, batch.prompt_length, temperature=temperature
        )
    agent = batch.agent_mask.bool()
    assert int(agent.sum()) > 20
    torch.testing.assert_close(logprobs[agent], batch.logprobs[agent], atol=2e-3, rtol=0)


@pytest.mark.parametrize("fault", ["raise", "nan", "wrong_type", "bad_observation"])
def test_a_faulty_environment_ends_its_episode_with_a_logged_error(make_lm, tiny_tokenizer, caplog, fault):
    envs = [CountingEnv(3), CountingEnv(3, fault=fault, fault_turn=2), CountingEnv(3)]
    with caplog.at_level(logging.ERROR, logger="rlhf_ext.environments"):
        batch = play(make_lm().eval(), tiny_tokenizer, envs)
    assert batch.errors[0] is None and batch.errors[2] is None
    assert batch.errors[1].startswith("environment CountingEnv: step() at turn 2: ")
    assert batch.errors[1] in caplog.text
    assert batch.turns.tolist() == [3, 1, 3] and batch.failed.tolist() == [False, True, False]
    assert batch.terminated.tolist() == [True, False, True] and not batch.truncated.any()
    assert len(segments(batch.agent_mask[1])) == 2  # its second action was taken; nothing came after it
    assert float(batch.turn_rewards[1].sum()) == 1.0  # only the first step's reward


def test_env_errors_raise_stops(make_lm, tiny_tokenizer):
    envs = [CountingEnv(3), CountingEnv(3, fault="raise", fault_turn=2)]
    with pytest.raises(EnvironmentStepError, match="environment CountingEnv: step\\(\\) at turn 2: raised KeyError"):
        play(make_lm().eval(), tiny_tokenizer, envs, env_errors="raise")
    with pytest.raises(EnvironmentStepError, match="turn 2: reward: expected a finite number"):
        play(make_lm().eval(), tiny_tokenizer, [CountingEnv(3, fault="nan")], env_errors="raise")


def test_a_failing_reset_raises(make_lm, tiny_tokenizer):
    class BrokenReset(CountingEnv):
        def reset(self, *, seed=None, options=None):
            return "no info"

    with pytest.raises(EnvironmentStepError, match="environment BrokenReset: reset\\(\\): expected a tuple"):
        play(make_lm().eval(), tiny_tokenizer, [CountingEnv(), BrokenReset()])


def test_same_seed_same_run(make_lm, tiny_tokenizer):
    model = make_lm().eval()
    runs = [play(model, tiny_tokenizer, [CountingEnv(3) for _ in range(4)], seed=s) for s in (5, 5, 6)]
    for name in ("sequences", "attention_mask", "agent_mask", "logprobs", "turn_rewards"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
    assert runs[0].actions == runs[1].actions
    assert runs[0].actions != runs[2].actions


def test_max_turns_and_token_budget_truncate(make_lm, tiny_tokenizer):
    model = make_lm().eval()
    batch = play(model, tiny_tokenizer, [CountingEnv(5) for _ in range(3)], max_turns=2)
    assert batch.turns.tolist() == [2, 2, 2] and batch.truncated.all() and not batch.terminated.any()
    budget = 9
    batch = play(model, tiny_tokenizer, [CountingEnv(5) for _ in range(3)], max_turns=5, max_episode_tokens=budget)
    assert batch.truncated.all() and not batch.terminated.any()
    assert int(batch.episode_mask.sum(1).max()) <= budget


def test_one_engine_call_per_turn_and_forwards_independent_of_batch(make_lm, tiny_tokenizer, monkeypatch):
    model = make_lm().eval()
    calls = []
    original = env_rollout._agent_turn

    def counting(engine, acting, *args):
        calls.append(int(acting.sum()))
        return original(engine, acting, *args)

    monkeypatch.setattr(env_rollout, "_agent_turn", counting)
    forwards = []
    model.register_forward_hook(lambda module, inputs, output: forwards.append(1))
    for B in (2, 6):
        calls.clear()
        forwards.clear()
        batch = play(model, tiny_tokenizer, [CountingEnv(3) for _ in range(B)], lengths=[1, 3] * (B // 2))
        assert calls == [B, B // 2, B // 2]  # one call per turn, for all live episodes
        assert int(batch.turns.max()) == len(calls)
        # 1 prefill, then per turn <= max_new_tokens decode forwards and <= 1 observation forward: never per episode
        assert len(forwards) <= 1 + len(calls) * (5 + 1)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_turns": 0}, "max_turns: expected an int >= 1, got 0"),
        ({"max_episode_tokens": 0}, "max_episode_tokens: expected an int >= 1 or None, got 0"),
        ({"env_errors": "ignore"}, "env_errors: expected one of ('log', 'raise'), got 'ignore'"),
        ({"seeds": [1]}, "seeds: expected one per environment (2), got 1"),
    ],
)
def test_bad_arguments(make_lm, tiny_tokenizer, kwargs, fragment):
    args = {"max_turns": 2, "seeds": [0, 1], **kwargs}
    with pytest.raises(ValueError) as caught:
        run_episodes(make_lm(), tiny_tokenizer, [CountingEnv(), CountingEnv()], settings_for(tiny_tokenizer), **args)
    assert fragment in str(caught.value)
    with pytest.raises(ValueError, match="envs: expected a non-empty list"):
        run_episodes(make_lm(), tiny_tokenizer, [], settings_for(tiny_tokenizer), max_turns=1)


def test_chat_turns_end_at_the_templates_end_of_turn_token(make_lm, tiny_tokenizer):
    """A template closing assistant messages with a special token other than EOS: turns stop there too, and
    the token is not part of the action."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tiny_tokenizer.chat_template.replace("</s>{% endfor %}", "<|system|>{% endfor %}")
    end = tok.convert_tokens_to_ids("<|system|>")
    model = eos_biased(make_lm(), tok, 0.0)
    with torch.no_grad():
        model.lm_head.bias[end] = 3.0
    batch = play(model.eval(), tok, [CountingEnv(3, chat=True) for _ in range(4)], settings=settings_for(tok))
    ends = [
        int(batch.sequences[b, batch.prompt_length + e - 1]) for b in range(4) for _, e in segments(batch.agent_mask[b])
    ]
    assert end in ends
    assert all("<|system|>" not in action for actions in batch.actions for action in actions)
    agent_tokens = batch.sequences[:, batch.prompt_length :][batch.agent_mask.bool()]
    assert int((agent_tokens == end).sum()) == ends.count(end)  # never inside a turn: every one ended its turn
