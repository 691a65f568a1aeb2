"""KV-cached rollout engine over Hugging Face causal LMs (sampling with the fused `rlhf_ext.ops.sample`), and the
one completion path every caller samples through (`complete`, `SamplingSettings`)."""

from rlhf_ext.generation.completions import SamplingSettings, complete, concat_rollouts, left_pad, response_texts
from rlhf_ext.generation.rollout import Rollout, generate

__all__ = ["Rollout", "SamplingSettings", "complete", "concat_rollouts", "generate", "left_pad", "response_texts"]
