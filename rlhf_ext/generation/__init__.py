"""KV-cached rollout engine over Hugging Face causal LMs (sampling with the fused `rlhf_ext.ops.sample`)."""

from rlhf_ext.generation.rollout import Rollout, generate

__all__ = ["Rollout", "generate"]
