"""One batch of on-policy experience (`Experience`), and the free functions PPO and GRPO build it with: sampling
through the one completion path (`rlhf_ext.generation.complete`, keyed by seed, step and row), and the
log-probs of the sampled responses under the policy or the reference (`policy_logprobs`, `reference_logprobs`).

Sampling is keyed, not streamed: the completions of rows [g, g + chunk) of a step's global batch are drawn with a
generator seeded from (seed, step, g). A run therefore samples the same completions whatever the number of processes
it is split over (given the same chunk size), and a resumed run needs no generator state.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_ext.generation import Rollout, SamplingSettings, complete, left_pad
from rlhf_ext.models.logprobs import sequence_logprobs
from rlhf_ext.trainers.lora import is_peft_model


@dataclass
class Experience:
    """Sampled, scored completions with what an update loop needs: what PPO's `make_experience` and GRPO's
    `generate_and_score` return. B rows, P = prompt_length (left-padded prompts), R response columns (each row
    right-padded after its stop token). Log-probs are at the sampling temperature."""

    sequences: torch.Tensor  # (B, P + R) int64: the prompt, then the response
    attention_mask: torch.Tensor  # (B, P + R) int64: 1 on the prompt's real tokens and the response up to its stop
    prompt_length: int  # P
    response_mask: torch.Tensor  # (B, R) float32: 1 up to and including the stop token, 0 after
    loss_mask: torch.Tensor  # (B, R) float32: the tokens the loss trains on (response_mask, minus rows left out)
    advantages: torch.Tensor  # (B, R) float32, 0 where masked
    scores: torch.Tensor  # (B,) float32: each completion's weighted reward (PPO: after missing_eos_penalty)
    per_source: torch.Tensor  # (B, S) float32: each reward source's score (NaN where a function returned None)
    finished: torch.Tensor  # (B,) bool: the row emitted a stop token (False: truncated)
    # (B, R) float32 under the policy that sampled, 0 where masked; None when it equals the policy being updated
    # (GRPO with one optimizer step per generation round: the update uses its own log-probs, detached)
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None  # (B, R) float32 under the reference, 0 where masked; None: no KL
    values: Optional[torch.Tensor] = None  # (B, R) float32: PPO's critic values, 0 where masked
    returns: Optional[torch.Tensor] = None  # (B, R) float32: PPO's GAE returns (advantages + values)
    rewards: Optional[torch.Tensor] = None  # (B, R) float32: PPO's per-token rewards (KL penalty + score on the last)
    kl: Optional[torch.Tensor] = None  # (B, R) float32: PPO's per-token KL estimate to the reference, 0 where masked
    # (B, R) float32 for multi-turn episodes: 1 on the tokens the agent sampled, 0 on environment tokens and
    # padding (response_mask then covers both kinds); None: every response token is the agent's
    agent_mask: Optional[torch.Tensor] = None
    time_rollout: float = 0.0  # seconds spent sampling
    time_scoring: float = 0.0  # seconds spent on log-probs, values and rewards

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) int64 response tokens per row, the stop token included."""
        return self.response_mask.sum(1).long()

    def to(self, device) -> "Experience":
        """The same experience with every tensor on `device` (checkpoints keep it on the CPU)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def autocast(args, device):
    """bf16 autocast on `device` when args.bf16, else nothing."""
    if args.bf16:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sampling_key(seed: int, step: int, row: int) -> int:
    """The seed of the generator that samples the chunk starting at global row `row` of step `step`."""
    return (seed * 1_000_003 + step) * 1_000_033 + row


def sample_completions(
    policy,
    prompts: list,
    settings: SamplingSettings,
    *,
    seed: int,
    step: int,
    row_offset: int = 0,
    chunk_size: Optional[int] = None,
) -> Rollout:
    """Completions of this process's prompts (token-id lists: rows `row_offset`, ... of step `step`'s global batch),
    left-padded and sampled by the policy in eval mode, `chunk_size` rows at a time, each chunk keyed by its first
    global row (`sampling_key`). Under FSDP call it with the policy's weights gathered."""
    device = next(policy.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, settings.pad_token_id, device)
    policy.eval()
    return complete(
        policy,
        prompt_ids,
        prompt_mask,
        settings,
        chunk_size=chunk_size,
        chunk_seed=lambda first: sampling_key(seed, step, row_offset + first),
    )


def row_chunks(rows: int, size: int) -> list:
    """Slices of `size` rows covering `rows` (the no-grad scoring passes take local_rollout_forward_batch_size)."""
    return [slice(i, i + size) for i in range(0, rows, size)]


def by_chunks(fn: Callable, rollout: Rollout, size: int):
    """`fn(sequences, attention_mask, prompt_length)` over `size` rows of the rollout at a time, its (rows, R)
    outputs joined into (B, R) and zeroed after each row's stop token; a tuple of them (None staying None) when `fn`
    returns a tuple.
    The no-grad scoring passes (old and reference log-probs, values) run this way to bound their memory."""
    mask = rollout.response_mask.float()
    sequences, attention_mask, P = rollout.sequences, rollout.attention_mask, rollout.prompt_length
    parts = [fn(sequences[c], attention_mask[c], P) for c in row_chunks(sequences.shape[0], size)]
    if isinstance(parts[0], tuple):
        return tuple(None if outputs[0] is None else torch.cat(outputs) * mask for outputs in zip(*parts))
    return torch.cat(parts) * mask


def call(model, fn, *args, **kwargs):
    """`fn(model, ...)`: how a model is run when it is not FSDP-sharded (BaseTrainer.run also handles sharded ones)."""
    return fn(model, *args, **kwargs)


def policy_logprobs(
    model,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    args,
    *,
    return_entropy: bool = False,
    run: Callable = call,
):
    """(B, R) float32 log-probs of the responses `sequences[:, P:]` under `model` (the policy, the old policy or the
    reference), at the sampling temperature; `(logprobs, entropy)` with return_entropy. `args` (PPOConfig or
    GRPOConfig) gives temperature, fused_linear_logprobs, logprobs_chunk_size, share_prompt_forward and bf16.
    `run(model, fn, ...)` calls `fn(model, ...)`: pass BaseTrainer.run so that an FSDP-sharded model runs inside its
    root's forward."""
    with autocast(args, sequences.device):
        return run(
            model,
            sequence_logprobs,
            sequences,
            attention_mask,
            prompt_length,
            temperature=args.temperature,
            return_entropy=return_entropy,
            fused_linear=args.fused_linear_logprobs,
            chunk_size=args.logprobs_chunk_size,
            share_prompt=args.share_prompt_forward,
        )


def has_reference(policy, ref_model) -> bool:
    """Whether there is a reference policy: `ref_model`, or the policy with its LoRA adapter disabled."""
    return ref_model is not None or is_peft_model(policy)


@torch.no_grad()
def reference_logprobs(policy, ref_model, sequences, attention_mask, prompt_length: int, args, *, run=call):
    """(B, R) log-probs under the frozen reference: `ref_model`, or with LoRA the policy with its adapter disabled
    (no second copy of the weights). See `policy_logprobs`."""
    if ref_model is not None:
        return policy_logprobs(ref_model, sequences, attention_mask, prompt_length, args, run=run)
    if not is_peft_model(policy):
        raise RuntimeError("reference_logprobs: there is no reference policy (no ref_model, no adapter)")
    with policy.disable_adapter():
        return policy_logprobs(policy, sequences, attention_mask, prompt_length, args, run=run)
