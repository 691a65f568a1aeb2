"""Rollout tokens/s: rlhf_ext.generation.generate against transformers' generate, same model and settings.

A ~20M-parameter Llama built from a config (V = 32000, hidden 256, 4 layers), batch 32, 32-token prompts,
128 new tokens, no EOS (every run produces B * 128 tokens); top-k 50 / top-p 0.9 and plain sampling. Our engine
runs twice: with its fused CPU decode step (`fused`, the default) and with the model's own forward per step
(`eager_decode`, fused_decode=False). A last line times the model alone (prefill + the 127 KV-cached decode
forwards with an argmax): the eager ceiling.
Run `pytest benchmarks/bench_rollout.py` (one round each; ratios printed at the end) or
`python benchmarks/bench_rollout.py`.
"""

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.conftest import sizes
from rlhf_ext.generation import generate
from rlhf_ext.models import position_ids_from_mask

BATCH, PROMPT, NEW, HIDDEN, LAYERS, VOCAB = sizes((32, 32, 128, 256, 4, 32000), (2, 4, 4, 32, 1, 500))
SETTINGS = {"top_k 50 + top_p 0.9": dict(top_k=50, top_p=0.9), "plain": dict(top_k=0, top_p=1.0)}


def build():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=int(HIDDEN * 2.6875),
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=PROMPT + NEW + 8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # never stop early: both sides produce B * NEW tokens
    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[: BATCH // 2, : PROMPT // 4] = 0  # half the prompts left-padded
    return model, ids.masked_fill(mask == 0, 0), mask


def runners(model, ids, mask, setting):
    kw = SETTINGS[setting]

    def ours(fused_decode=True):
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=NEW,
            temperature=1.0,
            pad_token_id=0,
            generator=torch.Generator().manual_seed(0),
            fused_decode=fused_decode,
            **kw,
        )
        assert out.response_ids.shape[1] == NEW
        return out

    def hf():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            pad_token_id=0,
            **kw,
        )
        assert out.shape[1] == PROMPT + NEW
        return out

    return {"fused": ours, "eager_decode": lambda: ours(fused_decode=False), "hf_generate": hf}


def forward_only(model, ids, mask):
    """Prefill + NEW - 1 cached decode forwards, greedy argmax: the time the model itself needs."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = position_ids_from_mask(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
    full = torch.cat([mask, torch.ones(ids.shape[0], NEW, dtype=mask.dtype)], 1)
    nxt = pos[:, -1:] + 1
    for t in range(NEW - 1):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(
            input_ids=tok,
            attention_mask=full[:, : PROMPT + t + 1],
            position_ids=nxt + t,
            past_key_values=cache,
            logits_to_keep=1,
        )


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("impl", ["fused", "eager_decode", "hf_generate"])
def test_rollout(benchmark, impl, setting):
    model, ids, mask = build()
    fn = runners(model, ids, mask, setting)[impl]
    benchmark.group = f"rollout {setting} B={BATCH} P={PROMPT} new={NEW} V={VOCAB}"
    benchmark.extra_info["role"] = impl
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    if getattr(benchmark, "stats", None) is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = BATCH * NEW / benchmark.stats.stats.median


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per engine, interleaved; the best is kept")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ids, mask = build()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama {params:.1f}M params, "
        f"B={BATCH} P={PROMPT} new={NEW} V={VOCAB}; best of {args.repeat} interleaved runs"
    )

    def best_rate(fns):
        best = {name: 0.0 for name in fns}
        for _ in range(args.repeat):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                best[name] = max(best[name], BATCH * NEW / (time.perf_counter() - start))
        return best

    with torch.no_grad():
        generate(model, ids[:2], mask[:2], max_new_tokens=2, pad_token_id=0)  # warm-up (allocator, threads)
        ceiling = best_rate({"forward": lambda: forward_only(model, ids, mask)})["forward"]
        print(f"model forward only (greedy argmax): {ceiling:8.0f} tokens/s")
        for setting in SETTINGS:
            rates = best_rate(runners(model, ids, mask, setting))
            print(
                f"{setting:<22} fused engine {rates['fused']:8.0f} tokens/s   eager decode step "
                f"{rates['eager_decode']:8.0f}   HF generate {rates['hf_generate']:8.0f} tokens/s   ratio "
                f"{rates['fused'] / rates['hf_generate']:5.2f}x"
            )


if __name__ == "__main__":
    main()
