"""Shared-prompt training forward (`sequence_logprobs(..., share_prompt=True)`): runs of identical consecutive
prompts (GRPO's groups) run their prompt once, the responses attend to its KV cache gathered to every row. The
log-probs, entropies and every parameter's gradient equal those of the full forward up to float rounding."""

import pytest
import torch

from rlhf_ext.generation.completions import left_pad
from rlhf_ext.models.logprobs import sequence_logprobs, shared_prompt_groups

pytest.importorskip("transformers")

from tests.hf_helpers import VOCAB, tiny_hf  # noqa: E402  (needs transformers)

PAD = 0
# Three prompts of different lengths (left-padded in the batch), each repeated G times, then a lone prompt.
PROMPTS = [[5, 9, 14], [7, 3, 22, 41, 8], [60, 2]]
G = 3


def grouped_batch(R=6, lone=True, seed=0):
    """(ids, mask, P): the grouped prompts left-padded, then R response tokens per row, the last rows' responses
    right-padded (a stop before the end)."""
    rows = [p for p in PROMPTS for _ in range(G)] + ([[11, 12, 13, 14]] if lone else [])
    prompt_ids, prompt_mask = left_pad(rows, PAD)
    g = torch.Generator().manual_seed(seed)
    B = prompt_ids.shape[0]
    response = torch.randint(3, VOCAB, (B, R), generator=g)
    response_mask = torch.ones(B, R, dtype=torch.long)
    response_mask[1, 3:] = 0
    response_mask[-1, 2:] = 0
    response = response.masked_fill(response_mask == 0, PAD)
    return torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1), prompt_ids.shape[1]


def logprobs_and_grads(model, ids, mask, P, share):
    model.zero_grad(set_to_none=True)
    logprobs, entropy = sequence_logprobs(model, ids, mask, P, temperature=0.7, return_entropy=True, share_prompt=share)
    response_mask = mask[:, P:].float()
    ((logprobs * response_mask).sum() + 0.1 * (entropy * response_mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach() * response_mask, entropy.detach() * response_mask, grads


@pytest.mark.parametrize("kind", ["llama_bias", "qwen2", "gpt2"])
@pytest.mark.parametrize("lone", [True, False])
def test_shared_prompt_forward_equals_the_full_forward(kind, lone):
    model = tiny_hf(kind)  # eval mode: gpt2's dropout is on in training (where sharing is refused, below)
    ids, mask, P = grouped_batch(lone=lone)
    assert shared_prompt_groups(model, ids, mask, P) is not None
    shared = logprobs_and_grads(model, ids, mask, P, share=True)
    full = logprobs_and_grads(model, ids, mask, P, share=False)
    torch.testing.assert_close(shared[0], full[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], full[1], atol=2e-5, rtol=1e-5)
    assert shared[2].keys() == full[2].keys() and len(full[2]) > 0
    for name in full[2]:
        torch.testing.assert_close(shared[2][name], full[2][name], atol=2e-5, rtol=1e-4, msg=name)


def test_shared_prompt_forward_runs_each_prompt_once():
    model = tiny_hf("llama_bias")
    ids, mask, P = grouped_batch()
    widths = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        sequence_logprobs(model, ids, mask, P, share_prompt=True)
    hook.remove()
    B, L = ids.shape
    assert widths == [(len(PROMPTS) + 1, P), (B, L - 1 - P)]  # distinct prompts once, then every response


def test_one_response_token_and_no_shared_prompt():
    model = tiny_hf("llama_bias")
    ids, mask, P = grouped_batch(R=1)
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logprobs(model, ids, mask, P, share_prompt=True), sequence_logprobs(model, ids, mask, P)
        )
    distinct = ids[[0, G, 2 * G]]  # one row per prompt: nothing to share, the plain forward runs
    assert shared_prompt_groups(model, distinct, mask[[0, G, 2 * G]], P) is None


def test_gradient_checkpointing_and_dropout_fall_back_to_the_full_forward():
    ids, mask, P = grouped_batch()
    model = tiny_hf("llama_bias").train()
    assert shared_prompt_groups(model, ids, mask, P) is not None  # training mode, no dropout: shared
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert shared_prompt_groups(model, ids, mask, P) is None
    gpt2 = tiny_hf("gpt2")
    assert shared_prompt_groups(gpt2, ids, mask, P) is not None  # eval: its dropout is off
    assert shared_prompt_groups(gpt2.train(), ids, mask, P) is None  # one mask for a whole run would differ
    from rlhf_ext.trainers.loading import disable_dropout

    disable_dropout(gpt2)  # what the trainers do by default (disable_dropout=True): sharing holds again
    assert shared_prompt_groups(gpt2, ids, mask, P) is not None
    llama = tiny_hf("llama_bias").train()
    next(m for m in llama.modules() if hasattr(m, "attention_dropout")).attention_dropout = 0.1  # SDPA's rate
    assert shared_prompt_groups(llama, ids, mask, P) is None


def test_grpo_step_is_the_same_with_the_shared_prompt_forward(make_lm, tiny_tokenizer, prompt_rows, cpu_args):
    """One GRPO round (reference log-probs, then an update) with and without share_prompt_forward: the same
    samples, reference log-probs, loss and gradients within float tolerance; shared, every log-prob forward
    runs the 2 distinct prompts once (2 rows) and then the 8 rows' responses."""
    from rlhf_ext import GRPOTrainer
    from tests.trainer_helpers import grpo_args, rows_for, target_fraction

    out = {}
    for share in (True, False):
        args = grpo_args(cpu_args, beta=0.1, share_prompt_forward=share)
        trainer = GRPOTrainer(
            make_lm(), [target_fraction], args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer
        )
        exp, _ = trainer.generate_and_score(rows_for(trainer, 2), 0, 0)
        shapes = []
        hook = trainer.policy.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))
        names = {id(p): n for n, p in trainer.policy.named_parameters()}
        grads = {}
        trainer.clip_and_step = lambda params: grads.update({names[id(p)]: p.grad.clone() for p in params}) or 0.0
        metrics = trainer.update(exp, 0)
        hook.remove()
        out[share] = exp, metrics, shapes, grads
    (exp_s, m_s, shapes_s, g_s), (exp_f, m_f, shapes_f, g_f) = out[True], out[False]
    assert torch.equal(exp_s.sequences, exp_f.sequences)
    torch.testing.assert_close(exp_s.ref_logprobs, exp_f.ref_logprobs, atol=2e-5, rtol=1e-5)
    assert m_s["loss"] == pytest.approx(m_f["loss"], rel=1e-4, abs=1e-6)
    assert g_s.keys() == g_f.keys() and len(g_f) > 0
    for name in g_f:
        torch.testing.assert_close(g_s[name], g_f[name], atol=2e-5, rtol=1e-4, msg=name)
    P = exp_s.prompt_length
    assert [s[0] for s in shapes_f] == [8] and shapes_f[0][1] > P  # the full forward: 8 rows, prompt + response
    assert [(s[0], s[1]) for s in shapes_s][0] == (2, P) and shapes_s[1][0] == 8  # 2 prompts, then 8 responses
