"""gather_logprobs test helpers shared by test_logprobs.py (also inside its per-ISA subprocess) and
test_cuda_sim_logprobs.py: tolerances (see test_logprobs.py's docstring for why), inputs, the float64 oracle."""

import torch

from rlhf_ext.ops import gather_logprobs
from rlhf_ext.ops.reference import gather_logprobs_reference

VALUE_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10)}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def value_tol(dtype):
    return VALUE_TOL.get(dtype, dict(rtol=1e-5, atol=1e-5))


def make_inputs(shape, dtype=torch.float32, scale=3.0, ignore_p=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    labels = torch.randint(0, V, shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < ignore_p] = -100
    return logits, labels


def oracle(logits, labels, temperature=1.0, ignore_index=-100, chunk=512):
    """float64 (logprobs, entropy), a block of rows at a time to bound the oracle's own memory."""
    V = logits.shape[-1]
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
    parts = [
        gather_logprobs_reference(
            flat[i : i + chunk],
            flat_labels[i : i + chunk],
            temperature,
            ignore_index,
            return_entropy=True,
            dtype=torch.float64,
        )
        for i in range(0, flat.shape[0], chunk)
    ]
    lp = torch.cat([p[0] for p in parts]).reshape(labels.shape)
    ent = torch.cat([p[1] for p in parts]).reshape(labels.shape)
    return lp, ent


def check_values(logits, labels, temperature=1.0, ignore_index=-100):
    lp, ent = gather_logprobs(logits, labels, temperature, ignore_index, return_entropy=True)
    assert lp.dtype == ent.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert lp.shape == ent.shape == labels.shape
    ref_lp, ref_ent = oracle(logits, labels, temperature, ignore_index)
    torch.testing.assert_close(lp.double(), ref_lp, **value_tol(logits.dtype))
    torch.testing.assert_close(ent.double(), ref_ent, **value_tol(logits.dtype))
    ignored = labels == ignore_index
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    # without return_entropy: the same log-probs
    torch.testing.assert_close(gather_logprobs(logits, labels, temperature, ignore_index), lp, rtol=0, atol=0)


def grads_and_reference(logits, labels, temperature, which, inplace, gen_seed=3):
    """Our gradient and the float64 oracle's for loss = sum(a * logprobs) + sum(b * entropy)."""
    g = torch.Generator().manual_seed(gen_seed)
    a, b = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    leaf = logits.detach().clone().requires_grad_()
    lp, ent = gather_logprobs(leaf * 1, labels, temperature, return_entropy=True, inplace_backward=inplace)
    loss = {"logprobs": (lp * a).sum(), "entropy": (ent * b).sum(), "both": (lp * a).sum() + (ent * b).sum()}[which]
    loss.backward()
    ref = logits.detach().double().requires_grad_()
    rlp, rent = gather_logprobs_reference(ref, labels, temperature, return_entropy=True, dtype=torch.float64)
    rloss = {"logprobs": (rlp * a).sum(), "entropy": (rent * b).sum(), "both": (rlp * a).sum() + (rent * b).sum()}[
        which
    ]
    rloss.backward()
    return leaf.grad, ref.grad
