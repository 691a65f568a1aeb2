"""Tiny Hugging Face causal LMs of several architectures (built from configs, no hub), left-padded batches and the
full-logits log-probs the fused helpers avoid: shared by test_logprobs_fused.py and test_introspect.py."""

import torch
import transformers

from rlhf_ext.models import position_ids_from_mask

VOCAB = 97


def tiny_hf(kind: str):
    """A tiny eval-mode model of `kind`: llama_bias (untied lm_head with a bias), gpt2 (tied embeddings, learned
    positions), qwen2 (tied), cohere (logits * logit_scale), granite (logits / logits_scaling), gemma2 (final
    tanh softcap)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama_bias":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
            )
        )
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.5))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**common, logits_scaling=4.0))
    elif kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)
        )
    else:
        raise ValueError(f"kind: expected one of llama_bias, gpt2, qwen2, cohere, granite, gemma2, got {kind!r}")
    return model.eval()


def padded_batch(B=3, L=12, pads=(0, 2, 4), seed=0):
    """(ids [B, L], mask [B, L]): random tokens, row b left-padded with pads[b] zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def full_logprobs(model, ids, mask, start, temperature=1.0):
    """Full [B, L, V] logits from the model's own forward, float64 log-softmax: (log-probs [B, R], entropy [B, R])
    of the tokens from column `start` on, the computation the helpers avoid."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits[:, start - 1 : -1].double() / temperature, -1)
    lp = logp.gather(-1, ids[:, start:, None]).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)
