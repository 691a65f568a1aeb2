"""Tiny causal LMs with sharp logits and the full-forward log-probs oracle, shared by the rollout engine's tests
(test_rollout.py, test_rollout_cache.py)."""

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

from rlhf_ext.generation import Rollout
from rlhf_ext.models import position_ids_from_mask
from rlhf_ext.models.tiny import tiny_config

VOCAB, PAD = 96, 0


def tiny(kind: str):
    """A `kind` ("llama", "qwen2" or "gpt2") causal LM of rlhf_ext's tiny_config (hidden 48, 2 layers, 4 heads),
    untied, with sharp logits, in eval mode."""
    model_class = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gpt2": GPT2LMHeadModel}[kind]
    extra = {} if kind == "gpt2" else {"tie_word_embeddings": False}  # the stock llama / qwen2 default
    config = tiny_config(kind, vocab_size=VOCAB, hidden_size=48, pad_token_id=PAD, **extra)
    torch.manual_seed(0)
    model = model_class(config)
    # Sharper logits than the default init, so that sampled trajectories are not near-uniform.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def forward_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) gathered at the response tokens from one full forward over the sequences."""
    mask = rollout.attention_mask
    position_ids = position_ids_from_mask(mask)
    logits = model(input_ids=rollout.sequences, attention_mask=mask, position_ids=position_ids).logits
    P = rollout.prompt_length
    logp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, rollout.response_ids[..., None]).squeeze(-1)
