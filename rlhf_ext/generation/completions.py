"""The one completion path: prompts (token-id lists) -> left-padded batch -> KV-cached `generate`, a chunk of
rows at a time -> one `Rollout`, and its responses as text. The trainers, the demo and `label pairs` all sample
through `complete`; `SamplingSettings` is the one place the sampling knobs are held and checked.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Optional

import torch

from rlhf_ext.generation.rollout import Rollout, generate


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. Built by each trainer config (`config.sampling_settings(tokenizer)`), by the
    demo and by `label pairs`; checked once here."""

    max_new_tokens: int  # response tokens at most (the stop token included)
    pad_token_id: int  # fills rows after they stop
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    stop_token_id: Optional[int] = None  # ends a row (kept as its last response token); None: run to max_new_tokens

    def __post_init__(self):
        def bad(name, expected):
            return ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an int >= 1")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise bad("pad_token_id", "a token id (int >= 0); set tokenizer.pad_token")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1] (0 = off)")
        if self.stop_token_id is not None and (isinstance(self.stop_token_id, bool) or self.stop_token_id < 0):
            raise bad("stop_token_id", "a token id (int >= 0) or None")

    def generate_kwargs(self) -> dict:
        """These settings as keyword arguments of `generate` (which names the stop token `eos_token_id`)."""
        kwargs = dataclasses.asdict(self)
        kwargs["eos_token_id"] = kwargs.pop("stop_token_id")
        return kwargs

    def greedy(self) -> "SamplingSettings":
        """The same settings decoding greedily (top_k = 1)."""
        return dataclasses.replace(self, top_k=1)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple:
    """(ids [B, L] int64, mask [B, L] int64) of token-id lists padded on the left to the longest."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, length - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def complete(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: SamplingSettings,
    *,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_seed: Optional[Callable[[int], int]] = None,
) -> Rollout:
    """Completions of left-padded prompts `[B, P]`, generated `chunk_size` rows at a time (default: all at
    once) and joined into one `Rollout` (response columns padded to the longest chunk).

    Randomness: `chunk_seed(first_row)` seeds a fresh generator for the chunk starting at that row (draws keyed
    by row, independent of how many chunks or processes there are); otherwise `generator` (one stream through
    every chunk); otherwise torch's default generator."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
    device = next(model.parameters()).device
    rows = prompt_ids.shape[0]
    chunk_size = chunk_size or rows
    parts = []
    for first in range(0, rows, chunk_size):
        chunk = slice(first, first + chunk_size)
        if chunk_seed is not None:
            generator = torch.Generator(device=device).manual_seed(chunk_seed(first) % (2**63 - 1))
        parts.append(
            generate(model, prompt_ids[chunk], prompt_mask[chunk], **settings.generate_kwargs(), generator=generator)
        )
    return parts[0] if len(parts) == 1 else concat_rollouts(parts, settings.pad_token_id)


def response_texts(tokenizer, rollout: Rollout) -> tuple:
    """(texts, ids): each row's response decoded without special tokens, and its token ids up to and including
    the stop token (the padding after it dropped)."""
    lengths = rollout.response_lengths.tolist()
    ids = [row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths)]
    return tokenizer.batch_decode(ids, skip_special_tokens=True), ids


def concat_rollouts(parts: list, pad_token_id: int) -> Rollout:
    """One Rollout from chunks generated for consecutive rows of the same left-padded prompt batch: the
    response columns are padded to the longest chunk (pad id for token ids, 0 for masks/log-probs)."""
    R = max(p.response_ids.shape[1] for p in parts)
    P = parts[0].prompt_length
    fields = {}
    for f in dataclasses.fields(parts[0]):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "prompt_length":
            fields[f.name] = P
        elif values[0] is None:
            fields[f.name] = None
        elif values[0].dim() == 1 or f.name == "prompt_mask":
            fields[f.name] = torch.cat(values)
        else:
            width = P + R if f.name == "sequences" else R
            fill = pad_token_id if f.name in ("sequences", "response_ids") else 0
            fields[f.name] = torch.cat(
                [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill) for v in values]
            )
    return type(parts[0])(**fields)
