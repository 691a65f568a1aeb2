"""Tiny causal LMs with sharp logits and the full-forward log-probs oracle, shared by the rollout engine's tests
(test_rollout.py, test_rollout_cache.py)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_ext.generation import Rollout
from rlhf_ext.models import position_ids_from_mask

VOCAB, PAD = 96, 0


def tiny(kind: str):
    torch.manual_seed(0)
    if kind in ("llama", "qwen2"):
        config_class, model_class = (
            (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        )
        cfg = config_class(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=PAD,
        )
        model = model_class(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=256, pad_token_id=PAD)
        model = GPT2LMHeadModel(cfg)
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
