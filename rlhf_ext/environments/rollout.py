"""Batched multi-turn episodes: the policy acts in B environments at once, over one KV cache.

Each turn is one engine call (`_agent_turn`) for every live episode: it decodes a column of tokens at a time
until every live row has ended its turn (stop token, max_new_tokens, or the episode's token budget). Then each
environment steps on its turn's decoded text, and the observations' tokens of every live episode are fed in
one forward, left-padded inside the chunk (ragged lengths; the last column is a real token for every row that
has one, so it gives that row's next-token logits). Rows that are not acting feed pad with mask 0, so the cache
holds holes in the middle of rows; positions come from the mask (cumsum), so each row sees exactly the
positions of its own unpadded episode. Nothing is re-encoded across turns and the agent's tokens are never
re-tokenised: what is trained on is what was sampled.

The EpisodeBatch packs each row's real tokens together (holes dropped, same tokens, same order, same
positions): left-padded first observation, then the episode, then padding, the layout every trainer already
feeds its training forwards (a single-turn rollout is the special case with one agent turn).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from rlhf_ext.environments.protocol import (
    EnvironmentStepError,
    check_reset,
    check_step,
    end_of_turn_token,
    render_observation,
)
from rlhf_ext.generation.completions import SamplingSettings, left_pad
from rlhf_ext.generation.rollout import _forward_kwargs, _stop_ids
from rlhf_ext.models.introspect import CacheArgs, cpu_packed_head, growing_kv_cache
from rlhf_ext.ops.sampling import prepare_settings, sample

logger = logging.getLogger("rlhf_ext.environments")
ENV_ERRORS = ("log", "raise")


@dataclass
class EpisodeBatch:
    """B episodes, row-aligned. P = prompt_length (the first observations, left-padded), T = the longest
    episode's tokens after it (agent and environment tokens, packed; padding after)."""

    sequences: torch.Tensor  # (B, P + T) int64
    attention_mask: torch.Tensor  # (B, P + T) int64: 0 on padding only
    prompt_length: int  # P
    agent_mask: torch.Tensor  # (B, T) float32: 1 on tokens the agent sampled (trained), 0 on env tokens / padding
    logprobs: torch.Tensor  # (B, T) float32: sampling log-probs (log_softmax(logits / T)), 0 off agent tokens
    turn_rewards: torch.Tensor  # (B, T) float32: each step's reward on the last agent token of the turn earning it
    final_reward: torch.Tensor  # (B,) float32: the reward of the episode's last step (0 without one)
    turns: torch.Tensor  # (B,) int64: environment steps taken
    terminated: torch.Tensor  # (B,) bool: the environment ended the episode
    truncated: torch.Tensor  # (B,) bool: the environment, max_turns or max_episode_tokens cut it short
    success: torch.Tensor  # (B,) bool: the last info's "success" if given, else terminated with final reward > 0
    errors: list = field(default_factory=list)  # B x (str | None): the logged environment error ending the episode
    infos: list = field(default_factory=list)  # B x [reset info, step infos...]
    actions: list = field(default_factory=list)  # B x [each turn's decoded text]
    envs: list = field(default_factory=list)  # the B environments, as they ended

    @property
    def episode_mask(self) -> torch.Tensor:
        """(B, T) float32: 1 on the episode's real tokens (agent and environment), 0 on padding."""
        return self.attention_mask[:, self.prompt_length :].float()

    @property
    def returns(self) -> torch.Tensor:
        """(B,) float32 undiscounted sum of each episode's step rewards."""
        return self.turn_rewards.sum(1)

    @property
    def failed(self) -> torch.Tensor:
        """(B,) bool: the episode ended on an environment error."""
        return torch.tensor([e is not None for e in self.errors], dtype=torch.bool, device=self.turns.device)


class _Engine:
    """One KV cache over B rows, fed chunks of columns: the prompt, then decode columns and observation chunks.
    Keeps every row's next-token logits after its last real token, and records the columns after the prompt."""

    def __init__(self, model, batch: int, settings: SamplingSettings, generator, device):
        self.model, self.device = model, device
        self.cache_args = CacheArgs(model, growing_kv_cache(model.config))
        self.decode_head = cpu_packed_head(model)
        self.extra = _forward_kwargs(model)
        self.sampling = prepare_settings(
            batch, device, settings.temperature, settings.top_k, settings.top_p, settings.min_p
        )
        self.sampling["generator"] = generator
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=device)  # (B, C) every column fed so far
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) real tokens fed so far
        self.logits = None  # (B, V) next-token logits after each row's last real token
        self.columns = {"ids": [], "mask": [], "agent": [], "logprobs": []}  # chunks after the prompt, (B, W) each

    def feed(self, ids: torch.Tensor, mask: torch.Tensor, agent=None, logprobs=None, record=True) -> int:
        """Forward the chunk `ids` / `mask` (B, W), left-padded inside it; returns its first column's index."""
        C, W = self.mask.shape[1], ids.shape[1]
        full = torch.cat([self.mask, mask], dim=1)  # (B, C + W)
        # (B, W) positions counting only real tokens: position_ids_from_mask(full)[:, C:] without the O(C) cumsum
        positions = (self.count[:, None] + mask.cumsum(1) - 1).clamp(min=0)
        self.count += mask.sum(1)
        with self.decode_head:
            output = self.model(
                input_ids=ids,
                attention_mask=full,
                position_ids=positions,
                **self.cache_args(torch.arange(C, C + W, device=self.device)),
                **self.extra,
            )
        last = output.logits[:, -1, :]  # (B, V) the chunk's last column: a real token where the row has one
        self.logits = last if self.logits is None else torch.where(mask[:, -1:].bool(), last, self.logits)
        self.mask = full
        if record:
            zeros = torch.zeros(ids.shape, dtype=torch.float32, device=self.device)
            for name, value in (("ids", ids), ("mask", mask), ("agent", agent), ("logprobs", logprobs)):
                self.columns[name].append(zeros if value is None else value)
        return C


def _agent_turn(engine: _Engine, acting: torch.Tensor, budget_left: torch.Tensor, settings, stop_ids):
    """The one engine call of a turn: decode for the rows `acting` (B,) bool until each has emitted a stop token,
    max_new_tokens, or spent `budget_left` (B,) tokens. Returns (last_column (B,) int64: each acting row's last
    token's cache column, stopped (B,) bool: it ended on a stop token, spent (B,) int64 tokens sampled,
    token ids per row (B lists))."""
    acting = acting.clone()
    B = acting.shape[0]
    last_column = torch.full((B,), -1, dtype=torch.long, device=engine.device)
    stopped = torch.zeros(B, dtype=torch.bool, device=engine.device)
    spent = torch.zeros(B, dtype=torch.long, device=engine.device)
    sampled = []
    for _ in range(settings.max_new_tokens):
        tokens, logprobs = sample(engine.logits, **engine.sampling)
        tokens = torch.where(acting, tokens, settings.pad_token_id)  # (B,)
        agent = acting.float()[:, None]  # (B, 1)
        column = engine.feed(
            tokens[:, None], acting.long()[:, None], agent, torch.where(acting, logprobs, 0.0)[:, None]
        )
        last_column = torch.where(acting, column, last_column)
        sampled.append(torch.where(acting, tokens, -1))
        spent += acting.long()
        is_stop = torch.isin(tokens, stop_ids) & acting
        stopped |= is_stop
        acting &= ~is_stop & (spent < budget_left)
        if not bool(acting.any()):
            break
    columns = torch.stack(sampled, dim=1).tolist()  # (B, steps) on the host, -1 where the row was not acting
    return last_column, stopped, spent, [[t for t in row if t >= 0] for row in columns]


def _check_arguments(envs, settings, max_turns, max_episode_tokens, seeds, options, env_errors):
    if not isinstance(envs, (list, tuple)) or not envs:
        raise ValueError(f"envs: expected a non-empty list of environments, got {type(envs).__name__}")
    if not isinstance(settings, SamplingSettings):
        raise TypeError(f"settings: expected a SamplingSettings, got {type(settings).__name__}")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns: expected an int >= 1, got {max_turns!r}")
    if max_episode_tokens is not None and (
        isinstance(max_episode_tokens, bool) or not isinstance(max_episode_tokens, int) or max_episode_tokens < 1
    ):
        raise ValueError(f"max_episode_tokens: expected an int >= 1 or None, got {max_episode_tokens!r}")
    for name, value in (("seeds", seeds), ("options", options)):
        if value is not None and len(value) != len(envs):
            raise ValueError(f"{name}: expected one per environment ({len(envs)}), got {len(value)}")
    if env_errors not in ENV_ERRORS:
        raise ValueError(f"env_errors: expected one of {ENV_ERRORS}, got {env_errors!r}")


class _Episode:
    """One row's host-side state between turns."""

    def __init__(self, env, info, history):
        self.env, self.history = env, history
        self.infos, self.actions, self.rewards = [info], [], []  # rewards: (cache column, reward)
        self.done = self.terminated = self.truncated = False
        self.error = None
        self.tokens = 0  # tokens after the first observation

    def fail(self, error: EnvironmentStepError, env_errors: str):
        if env_errors == "raise":
            raise error
        logger.error("%s (the episode ends; the rest of the batch carries on)", error)
        self.error, self.done = str(error), True


def _step(episode: _Episode, turn: int, action: str, env_errors: str):
    """episode.env.step(action) checked; None when it broke the protocol (logged, episode ended) or the result."""
    try:
        return check_step(episode.env, turn, episode.env.step(action))
    except EnvironmentStepError as error:
        episode.fail(error, env_errors)
    except Exception as error:
        wrapped = EnvironmentStepError(episode.env, turn, f"raised {type(error).__name__}: {error}")
        if env_errors == "raise":
            raise wrapped from error
        episode.fail(wrapped, env_errors)
    return None


@torch.no_grad()
def run_episodes(
    policy,
    tokenizer,
    envs: list,
    settings: SamplingSettings,
    *,
    max_turns: int,
    max_episode_tokens: Optional[int] = None,
    seeds: Optional[list] = None,
    options: Optional[list] = None,
    env_errors: str = "log",
    generator: Optional[torch.Generator] = None,
    stop_token_ids: Optional[list] = None,
) -> EpisodeBatch:
    """Play one episode in each of `envs` (fresh environments) with `policy` (a causal LM, in eval mode).

    env.reset(seed=seeds[i], options=options[i]) gives the first observation (the prompt). An agent turn ends at
    a stop token (settings.stop_token_id, the tokenizer's eos, `stop_token_ids`, and with chat observations the
    template's end-of-turn token, `protocol.end_of_turn_token`) or after settings.max_new_tokens tokens; its text
    (without the stop token) is the action.
    The episode ends when the environment terminates or truncates it, after `max_turns` steps (truncated), or
    when its tokens after the first observation reach `max_episode_tokens` (truncated; an observation that
    would exceed it is not appended). env_errors="log": an environment that raises or breaks the protocol in
    `step` ends its episode with a logged error naming the environment and turn; "raise": the error propagates.
    A failing `reset` always raises (the episode would have no prompt). `generator` seeds the sampling.
    """
    _check_arguments(envs, settings, max_turns, max_episode_tokens, seeds, options, env_errors)
    B = len(envs)
    device = next(policy.parameters()).device
    extra_stops = [t for t in (settings.stop_token_id, *(stop_token_ids or [])) if t is not None]
    stop_ids = _stop_ids(tokenizer.eos_token_id, extra_stops, device)
    episodes, prompts = [], []
    for i, env in enumerate(envs):
        try:
            out = env.reset(seed=None if seeds is None else seeds[i], options=None if options is None else options[i])
        except Exception as error:
            raise EnvironmentStepError(env, 0, f"raised {type(error).__name__}: {error}") from error
        observation, info = check_reset(env, out)
        tools = getattr(env, "tool_schemas", None)
        prompts.append(render_observation(tokenizer, observation, None, first=True, tools=tools))
        if not prompts[-1]:
            raise EnvironmentStepError(env, 0, "the first observation renders to no tokens")
        episodes.append(_Episode(env, info, None if isinstance(observation, str) else list(observation)))

    if any(e.history is not None for e in episodes) and getattr(tokenizer, "chat_template", None) is not None:
        stop_ids = torch.unique(torch.cat([stop_ids, _stop_ids(end_of_turn_token(tokenizer), None, device)]))
    engine = _Engine(policy, B, settings, generator, device)
    prompt_ids, prompt_mask = left_pad(prompts, settings.pad_token_id, device)
    engine.feed(prompt_ids, prompt_mask, record=False)
    budget = max_episode_tokens or 2**62
    for turn in range(1, max_turns + 1):
        acting = torch.tensor([not e.done for e in episodes], dtype=torch.bool, device=device)
        if not bool(acting.any()):
            break
        budget_left = torch.tensor([budget - e.tokens for e in episodes], dtype=torch.long, device=device)
        last_column, stopped, spent, turn_ids = _agent_turn(engine, acting, budget_left, settings, stop_ids)
        last_column, stopped, spent = last_column.tolist(), stopped.tolist(), spent.tolist()
        observations = [[] for _ in range(B)]
        for i, episode in enumerate(episodes):
            if episode.done:
                continue
            episode.tokens += spent[i]
            if episode.tokens >= budget and not stopped[i]:  # cut mid-turn: the action is incomplete
                episode.done = episode.truncated = True
                continue
            # The action is the turn's text without its stop token; other special tokens stay (a tool-call
            # marker such as <tool_call> is often one, and the environment must see it).
            action = tokenizer.decode(turn_ids[i][:-1] if stopped[i] else turn_ids[i], skip_special_tokens=False)
            episode.actions.append(action)
            result = _step(episode, turn, action, env_errors)
            if result is None:
                continue
            observation, reward, terminated, truncated, info = result
            episode.rewards.append((last_column[i], reward))
            episode.infos.append(info)
            if terminated or truncated or turn == max_turns:
                episode.done, episode.terminated, episode.truncated = True, terminated, not terminated
                continue
            if episode.history is not None:
                episode.history.append({"role": "assistant", "content": action})
            tokens = render_observation(tokenizer, observation, episode.history, first=False)
            if episode.history is not None and isinstance(observation, list):
                episode.history.extend(observation)
            if episode.tokens + len(tokens) >= budget:  # no room for the observation and an answer to it
                episode.done = episode.truncated = True
                continue
            episode.tokens += len(tokens)
            observations[i] = tokens
        if any(observations):  # one forward for every episode's observation, left-padded in the chunk
            width = max(len(o) for o in observations)
            padded = [[settings.pad_token_id] * (width - len(o)) + o for o in observations]
            ids = torch.tensor(padded, dtype=torch.long, device=device)
            mask = torch.tensor([[0] * (width - len(o)) + [1] * len(o) for o in observations], device=device)
            engine.feed(ids, mask)
    return _pack(engine, episodes, prompt_ids, prompt_mask, settings.pad_token_id)


def _pack(engine: _Engine, episodes: list, prompt_ids, prompt_mask, pad_token_id: int) -> EpisodeBatch:
    """The EpisodeBatch: each row's recorded columns with the holes dropped (real tokens first, order kept)."""
    device = prompt_ids.device
    columns = {name: torch.cat(parts, dim=1) for name, parts in engine.columns.items()}  # (B, C) each
    rewards = torch.zeros(columns["mask"].shape, dtype=torch.float32, device=device)
    first_column = prompt_ids.shape[1]  # recorded columns start after the prompt in the cache
    for i, episode in enumerate(episodes):
        for column, reward in episode.rewards:
            rewards[i, column - first_column] += reward
    order = torch.sort((columns["mask"] == 0).to(torch.int8), dim=1, stable=True).indices  # real columns first
    lengths = columns["mask"].sum(1)
    T = int(lengths.max())
    real = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T)
    take = order[:, :T]

    def packed(values, fill):
        return torch.where(real, values.gather(1, take), fill)

    ids = packed(columns["ids"], pad_token_id)
    final = [e.rewards[-1][1] if e.rewards else 0.0 for e in episodes]
    terminated = [e.terminated for e in episodes]
    success = [
        bool(e.infos[-1]["success"]) if "success" in e.infos[-1] else (e.terminated and r > 0)
        for e, r in zip(episodes, final)
    ]
    return EpisodeBatch(
        sequences=torch.cat([prompt_ids, ids], dim=1),
        attention_mask=torch.cat([prompt_mask, real.long()], dim=1),
        prompt_length=prompt_ids.shape[1],
        agent_mask=packed(columns["agent"].float(), 0.0),
        logprobs=packed(columns["logprobs"], 0.0),
        turn_rewards=packed(rewards, 0.0),
        final_reward=torch.tensor(final, dtype=torch.float32, device=device),
        turns=torch.tensor([len(e.rewards) for e in episodes], dtype=torch.long, device=device),
        terminated=torch.tensor(terminated, dtype=torch.bool, device=device),
        truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool, device=device),
        success=torch.tensor(success, dtype=torch.bool, device=device),
        errors=[e.error for e in episodes],
        infos=[e.infos for e in episodes],
        actions=[e.actions for e in episodes],
        envs=[e.env for e in episodes],
    )
