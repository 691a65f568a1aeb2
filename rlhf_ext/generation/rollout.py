"""KV-cached rollouts over any Hugging Face causal LM, sampling with the fused `rlhf_ext.ops.sample`.

One prefill over the left-padded prompts (only the last position's logits are computed; consecutive rows with the
same prompt, as GRPO's groups, share one prefill whose KV cache is expanded to the group), then a decode loop that
feeds one token per row through the cache, samples, and stops as soon as every row has emitted a stop token.
Finished rows keep emitting `pad_token_id` (masked out, log-prob 0) so the batch stays rectangular; rows that
never stop are truncated at `max_new_tokens` and flagged `finished == False`. Nothing `[B, R, V]` is kept.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch

from rlhf_ext.models.fused_decode import FusedDecoder
from rlhf_ext.models.introspect import (
    CacheArgs,
    accepts_kwarg,
    cpu_packed_head,
    growing_kv_cache,
    position_ids_from_mask,
    prompt_groups,
)
from rlhf_ext.ops.sampling import prepare_settings, sample

Setting = Union[int, float, torch.Tensor]


@dataclass
class Rollout:
    """Prompts and sampled responses, row-aligned. P = prompt_length, R = generated steps (<= max_new_tokens)."""

    sequences: torch.Tensor  # (B, P + R) int64: left-padded prompt, then the response (pad after the stop token)
    prompt_length: int  # P
    prompt_mask: torch.Tensor  # (B, P) int64: the prompts' attention mask (0 on left padding)
    response_ids: torch.Tensor  # (B, R) int64
    response_mask: torch.Tensor  # (B, R) int64: 1 up to and including the stop token, 0 after
    logprobs: torch.Tensor  # (B, R) float32: log_softmax(logits / T)[token] at sampling time, 0 where masked
    finished: torch.Tensor  # (B,) bool: the row emitted a stop token (False: truncated at max_new_tokens)
    values: Optional[torch.Tensor] = None  # (B, R) float32 with return_values=True, 0 where masked

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) int64 mask of real tokens, for the training forward pass over `sequences`."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64 number of response tokens per row, the stop token included."""
        return self.response_mask.sum(dim=1)


def _check_inputs(input_ids, attention_mask, max_new_tokens, pad_token_id, temperature, top_k, top_p, min_p):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-d tensor [B, P], got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected shape {tuple(input_ids.shape)} (the shape of input_ids), "
            f"got {tuple(getattr(attention_mask, 'shape', ()))}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: expected at least one prompt position, got P = 0")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id: required (finished rows are filled with it); pass tokenizer.pad_token_id "
            "or, if the tokenizer has none, tokenizer.eos_token_id"
        )
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id: expected a token id (int >= 0), got {pad_token_id!r}")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask: every prompt needs at least one real token; some row is all padding")
    # Left padding: once a row's mask turns on, it stays on.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask: prompts must be left-padded (a 0 follows a 1 in some row); "
            "set tokenizer.padding_side = 'left'"
        )
    for name, value, ok, expected in (
        ("temperature", temperature, lambda v: v >= 0, ">= 0"),
        ("top_k", top_k, lambda v: v >= 0, ">= 0 (0 = off)"),
        ("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
        ("min_p", min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    ):
        if not isinstance(value, torch.Tensor) and not ok(value):
            raise ValueError(f"{name}: expected a value {expected}, got {value!r}")


def _stop_ids(eos_token_id, stop_token_ids, device) -> torch.Tensor:
    ids = []
    for item in (eos_token_id, stop_token_ids):
        if item is None:
            continue
        ids.extend([item] if isinstance(item, int) else list(item))
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id / stop_token_ids: expected token ids (ints >= 0), got {ids!r}")
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)


def _forward_kwargs(model) -> dict:
    """Ask for the last position's logits only, where the model's forward takes `logits_to_keep` (HF causal LMs)."""
    return {"logits_to_keep": 1} if accepts_kwarg(model, "logits_to_keep") else {}


def _last_value(output) -> torch.Tensor:
    values = getattr(output, "values", None)
    if not isinstance(values, torch.Tensor):
        raise TypeError(
            "return_values=True: the model's output has no `values` tensor; it must return per-position "
            "values [B, L] or [B, L, 1] (a policy with a value head)"
        )
    return (values.squeeze(-1) if values.dim() == 3 else values)[:, -1].float()


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: Setting = 1.0,
    top_k: Setting = 0,
    top_p: Setting = 1.0,
    min_p: Setting = 0.0,
    eos_token_id: Optional[Union[int, Iterable[int]]] = None,
    stop_token_ids: Optional[Iterable[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    return_values: bool = False,
    cache: str = "dynamic",
    cuda_graph: bool = False,
    share_prompt_prefill: bool = True,
    fused_decode: bool = True,
) -> Rollout:
    """Sample up to `max_new_tokens` tokens per prompt with a KV cache. See `Rollout` for the outputs.

    input_ids / attention_mask: (B, P) left-padded prompts. temperature, top_k, top_p, min_p: scalars or per-row
    tensors (B,), as for `rlhf_ext.ops.sample`; temperature 0 is greedy. eos_token_id and stop_token_ids (ints or
    lists of ints) end a row; the stop token is part of the response (mask 1). pad_token_id (required) fills rows
    after they finish. generator: a torch.Generator on the model's device for reproducible draws.
    return_values: also record, for each response token, the model's `values` output at the position that
    predicted it (for a policy with a value head whose output carries `values` [B, L] or [B, L, 1]).
    cache: "dynamic" (a DynamicCache appending into reserved buffers: `growing_kv_cache`) or "static"
    (StaticCache sized P + max_new_tokens, where the model supports it).
    cuda_graph: on CUDA with cache="static", capture the decode step (forward + sampler) in a CUDA graph and
    replay it for every further step.
    share_prompt_prefill: with cache="dynamic" (and return_values off), prefill each run of identical consecutive
    prompts once and expand its KV cache to the run's rows (GRPO's num_generations rows per prompt). The samples
    are those of the unshared prefill for the same generator (same logits up to float rounding).
    fused_decode: with cache="dynamic" on the CPU (and return_values off), run each decode step of a model that
    `rlhf_ext.models.fused_decode` supports (Llama, Mistral in float32) as one fused op: the same maths as the
    model's forward to float rounding, ~2x faster for small models. Other models keep their own forward.
    """
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache: expected 'dynamic' or 'static', got {cache!r}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("model: expected a decoder-only causal LM, got an encoder-decoder model")
    _check_inputs(input_ids, attention_mask, max_new_tokens, pad_token_id, temperature, top_k, top_p, min_p)
    device = next(model.parameters()).device
    if cuda_graph and (not _can_capture(device) or cache != "static"):
        raise ValueError(
            f"cuda_graph=True needs a CUDA model and cache='static', got device {device} and cache={cache!r}"
        )
    if cuda_graph and return_values:
        raise ValueError("cuda_graph=True does not support return_values=True")
    for name, flag in (("share_prompt_prefill", share_prompt_prefill), ("fused_decode", fused_decode)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected a bool, got {flag!r}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    prompt_mask = attention_mask.to(device=device, dtype=torch.long)
    stop_ids = _stop_ids(eos_token_id, stop_token_ids, device)
    B, P = input_ids.shape

    from transformers import StaticCache

    kv_cache = (
        StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
        if cache == "static"
        else growing_kv_cache(model.config, P + max_new_tokens)
    )
    extra = _forward_kwargs(model)
    cache_args = CacheArgs(model, kv_cache)
    # Scalars stay Python numbers and per-row tensors move to the device once, here: nothing in the decode step
    # reads a value back to the host or copies from pageable memory (neither is allowed in a captured graph).
    sampling = prepare_settings(B, device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampling["generator"] = generator
    position_ids = position_ids_from_mask(prompt_mask)  # (B, P)
    cache_position = torch.arange(P, device=device)  # (P,) the cache slots the prompt fills
    shared = None
    if share_prompt_prefill and cache == "dynamic" and not return_values and hasattr(kv_cache, "batch_select_indices"):
        shared = prompt_groups(input_ids, prompt_mask)
    # Shared: the prefill runs on the first row of each run (G' <= B rows); the cache's keys/values and the last
    # logits are then gathered back to B rows (each row a copy of its run's prefill).
    first, groups = shared if shared is not None else (slice(None), None)
    decode_head = cpu_packed_head(model)  # entered around each forward, built once
    with decode_head:
        output = model(
            input_ids=input_ids[first],
            attention_mask=prompt_mask[first],
            position_ids=position_ids[first],
            **cache_args(cache_position),
            **extra,
        )
    logits = output.logits[:, -1, :]  # (G' or B, V)
    if groups is not None:
        kv_cache.batch_select_indices(groups)
        logits = logits[groups]  # (B, V)

    response = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    values = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if return_values else None
    full_mask = torch.cat([prompt_mask, torch.ones((B, max_new_tokens), dtype=torch.long, device=device)], dim=1)
    next_position = position_ids[:, -1:] + 1  # (B, 1)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    cache_position = cache_position[-1:] + 1  # (1,) the slot the next decode step writes
    stepper = _GraphStepper(model, cache_args, prompt_mask, max_new_tokens, sampling, extra) if cuda_graph else None
    fused = None
    if fused_decode and cache == "dynamic" and not return_values and device.type == "cpu" and max_new_tokens > 1:
        fused = FusedDecoder.for_model(model, decode_head)
        if fused is not None and not fused.load_cache(kv_cache, prompt_mask, P + max_new_tokens):
            fused = None
        if fused is not None:
            output = kv_cache = cache_args = None  # the prompt's keys and values now live in the decoder's buffers

    steps = 0
    for t in range(max_new_tokens):
        if return_values:
            values[:, t] = torch.where(unfinished, _last_value(output), 0.0)
        tokens, token_logprobs = sample(logits, **sampling) if t == 0 or stepper is None else stepper.sampled
        tokens = torch.where(unfinished, tokens, pad_token_id)
        response[:, t] = tokens
        response_mask[:, t] = unfinished
        logprobs[:, t] = torch.where(unfinished, token_logprobs, 0.0)
        unfinished &= ~torch.isin(tokens, stop_ids)
        steps = t + 1
        if t == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        if stepper is not None:
            stepper.step(tokens, next_position, t)
        elif fused is not None:
            logits = fused.step(tokens, next_position, P + t)
        else:
            with decode_head:
                output = model(
                    input_ids=tokens[:, None],
                    attention_mask=full_mask[:, : P + t + 1],
                    position_ids=next_position,
                    **cache_args(cache_position),
                    **extra,
                )
            logits = output.logits[:, -1, :]
        next_position = next_position + 1
        cache_position = cache_position + 1

    response, response_mask, logprobs = response[:, :steps], response_mask[:, :steps], logprobs[:, :steps]
    return Rollout(
        sequences=torch.cat([input_ids, response], dim=1),
        prompt_length=P,
        prompt_mask=prompt_mask,
        response_ids=response,
        response_mask=response_mask,
        logprobs=logprobs,
        finished=~unfinished,
        values=values[:, :steps] if values is not None else None,
    )


def _can_capture(device: torch.device) -> bool:
    return device.type == "cuda"


def _capture(fn, generator):
    """Capture `fn()` (reading only static buffers) in a CUDA graph; returns (graph, fn's outputs). The outputs
    are the graph's static output tensors: each replay overwrites them. Nothing runs until the first replay."""
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class _GraphStepper:
    """Decode steps on CUDA with a StaticCache, replayed from one captured CUDA graph.

    The graph reads the fed tokens and positions (B, 1), the cache slot `cache_position` (1,) and a 4-d additive
    attention mask (B, 1, 1, P + max_new_tokens) from static buffers, all updated outside it by device-side
    writes (no host sync); the sampler's settings are Python numbers or device tensors and its Philox seed/offset
    come from the generator's graph-safe state, so every replay writes the next cache slot and draws fresh
    tokens. The first decode step runs eagerly (it is the warm-up), the second is captured, and every later step
    replays. return_values is not supported here.
    """

    def __init__(self, model, cache_args, prompt_mask, max_new_tokens, sampling, extra):
        B, P = prompt_mask.shape
        dtype = next(model.parameters()).dtype
        device = prompt_mask.device
        self.model, self.cache_args, self.sampling, self.extra, self.P = model, cache_args, sampling, extra, P
        self.tokens = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.cache_position = torch.full((1,), P, dtype=torch.long, device=device)
        self.mask = torch.full((B, 1, 1, P + max_new_tokens), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask[:, 0, 0, :P].masked_fill_(prompt_mask.bool(), 0.0)
        self.graph = None
        self.sampled = None

    def _forward_and_sample(self):
        output = self.model(
            input_ids=self.tokens,
            attention_mask=self.mask,
            position_ids=self.positions,
            **self.cache_args(self.cache_position),
            **self.extra,
        )
        return sample(output.logits[:, -1, :], **self.sampling)

    def step(self, tokens, positions, t):
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions)
        self.cache_position.fill_(self.P + t)
        self.mask[:, 0, 0, self.P + t] = 0.0  # the slot this step writes
        if t == 0:
            self.sampled = self._forward_and_sample()
        elif self.graph is None:
            self.graph, self.sampled = _capture(self._forward_and_sample, self.sampling.get("generator"))
            self.graph.replay()
        else:
            self.graph.replay()
        if bool((self.sampled[0] < 0).any()):
            raise ValueError("logits: a row contains NaN or +inf, or has no finite logit; nothing can be sampled")
