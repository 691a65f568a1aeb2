"""Public fused ops. Each wraps a `torch.ops.rlhf_ext.*` kernel with argument checks, a fake
(meta) implementation for torch.compile, and an autograd formula; `reference.py` holds their
plain-PyTorch twins."""

__all__ = []

# ---- gae / whiten ----
from rlhf_ext.ops.gae import gae  # noqa: E402
from rlhf_ext.ops.whiten import masked_mean, masked_var, masked_whiten  # noqa: E402

__all__ += ["gae", "masked_mean", "masked_var", "masked_whiten"]

# ---- logprobs ----
from rlhf_ext.ops.logprobs import fused_linear_logprobs, gather_logprobs  # noqa: E402

__all__ += ["gather_logprobs", "fused_linear_logprobs"]


# ---- ppo_loss ----
from rlhf_ext.ops.ppo_loss import PPOLossOutput, kl_penalty, ppo_loss  # noqa: E402

__all__ += ["PPOLossOutput", "kl_penalty", "ppo_loss"]


# ---- sampling ----
from rlhf_ext.ops.sampling import sample  # noqa: E402

__all__ += ["sample"]


# ---- packed_linear (CPU only) ----
from rlhf_ext.ops.packed_linear import pack_linear_weight, packed_linear  # noqa: E402

__all__ += ["pack_linear_weight", "packed_linear"]


# ---- decode_step (CPU only) ----
from rlhf_ext.ops.decode_step import decode_step, pack_decoder_layer  # noqa: E402

__all__ += ["decode_step", "pack_decoder_layer"]
