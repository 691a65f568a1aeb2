"""rlhf_ext: RLHF for Hugging Face Transformers with fused C++/CUDA kernels on the hot paths.

`import rlhf_ext` loads the compiled core (registering `torch.ops.rlhf_ext.*`) and the public ops.
Trainers are imported lazily, so kernel users do not pay for importing transformers.
"""

from rlhf_ext._loader import load_compiled

_C = load_compiled()

from rlhf_ext import ops  # noqa: E402  (registers fake/autograd implementations)

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
    "SFTConfig": "rlhf_ext.trainers.sft",
    "SFTTrainer": "rlhf_ext.trainers.sft",
    "RewardConfig": "rlhf_ext.trainers.reward",
    "RewardTrainer": "rlhf_ext.trainers.reward",
    "PPOConfig": "rlhf_ext.trainers.ppo",
    "PPOTrainer": "rlhf_ext.trainers.ppo",
    "GRPOConfig": "rlhf_ext.trainers.grpo",
    "GRPOTrainer": "rlhf_ext.trainers.grpo",
    "RLOOConfig": "rlhf_ext.trainers.rloo",
    "RLOOTrainer": "rlhf_ext.trainers.rloo",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_ext' has no attribute {name!r}")


def build_info() -> dict:
    """How the compiled core was built: torch version, CUDA yes/no, archs, threads."""
    return dict(_C.build_info())


__all__ = ["ops", "build_info", "__version__", *_LAZY]
