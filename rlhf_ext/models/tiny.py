"""Tiny, real Hugging Face models and a tokenizer trained locally: for tests, the demo and examples.

Nothing here touches the Hub. The tokenizer is trained with `tokenizers` on a corpus (a small
generated one by default) and wrapped in `PreTrainedTokenizerFast` with pad/eos tokens and, optionally,
a chat template. The models are the stock Llama / GPT-2 / Qwen2 classes built from small configs, so
every code path the trainers take on them is the one real checkpoints take.
"""

import random
from collections.abc import Iterable
from typing import Optional

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TOOL_ROLE_TOKEN = "<|tool|>"

# One turn per message: the role marker, the content, then EOS, so a policy learns to end its turn with
# EOS. `add_generation_prompt` opens an assistant turn. Rendering a prefix of the conversation gives a
# token prefix of the full rendering (the SFT trainer relies on this to find assistant tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# CHAT_TEMPLATE plus tools, Hermes/Qwen style: `tools` (JSON schemas) become a system turn listing each tool as
# `name(arg, ...): description`; an assistant message's `tool_calls` are written after its content as
# `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which is also what a policy emits to call one; tool
# results are turns of role "tool". Kept short because tiny models have short contexts. Without tools and
# tool_calls it renders exactly as CHAT_TEMPLATE, and a prefix of a conversation still renders as a token prefix.
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for tool in tools %}"
    "{% set f = tool['function'] if 'function' in tool else tool %}"
    " {{ f['name'] }}({{ (f.get('parameters') or {}).get('properties', {}) | list | join(', ') }})"
    "{% if f.get('description') %}: {{ f['description'] }}{% endif %};{% endfor %}</s>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}{% set f = call['function'] if 'function' in call else call %}"
    '<tool_call>{"name": {{ f["name"] | tojson }}, "arguments": {{ f["arguments"] | tojson }}}</tool_call>'
    "{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SUBJECTS = ["the movie", "the film", "this book", "the food", "the hotel", "our trip", "the show", "the game"]
_VERBS = ["was", "is", "felt", "seemed", "looked"]
_ADJECTIVES = ["good", "great", "bad", "awful", "fine", "lovely", "boring", "amazing", "terrible", "nice"]
_TAILS = ["and fun", "but long", "for kids", "to me", "at night", "in the end", "overall", "today"]


def default_corpus(num_sentences: int = 2000, seed: int = 0) -> list:
    """Short review-like sentences from a fixed grammar; enough for a few-hundred-token BPE."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_ADJECTIVES)]
        if rng.random() < 0.6:
            words.append(rng.choice(_TAILS))
        lines.append(" ".join(words) + rng.choice([".", "!", ""]))
    return lines


def build_tokenizer(
    corpus: Optional[Iterable[str]] = None,
    vocab_size: int = 384,
    kind: str = "bpe",
    chat_template: bool = True,
    pad_token: Optional[str] = PAD,
    tool_calls: bool = False,
):
    """A `PreTrainedTokenizerFast` trained on `corpus` (default: `default_corpus()`).

    kind: "bpe" (byte-level BPE: decode(encode(text)) == text) or "wordlevel" (whitespace words).
    Special tokens: `<pad>` (pass pad_token=None for a tokenizer without one), `<s>`, `</s>` (EOS),
    `<unk>` and the chat role markers. With chat_template=True the tokenizer gets CHAT_TEMPLATE; with
    tool_calls=True as well, TOOL_CHAT_TEMPLATE and the role marker `<|tool|>` (appended after the others, so
    every other special token keeps its id). `<tool_call>` tags stay plain text: decoding a policy's turn
    without special tokens must keep them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = list(corpus) if corpus is not None else default_corpus()
    roles = [*ROLE_TOKENS, TOOL_ROLE_TOKEN] if tool_calls else list(ROLE_TOKENS)
    specials = [PAD, BOS, EOS, UNK, *roles]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"kind: expected 'bpe' or 'wordlevel', got {kind!r}")
    tok.train_from_iterator(lines, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=pad_token,
        additional_special_tokens=roles,
    )
    if chat_template:
        wrapped.chat_template = TOOL_CHAT_TEMPLATE if tool_calls else CHAT_TEMPLATE
    return wrapped


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 384,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    tokenizer=None,
    **overrides,
):
    """A small config of the stock `arch` class ("llama", "gpt2" or "qwen2"). With `tokenizer`, the
    vocabulary size and the pad/bos/eos ids are taken from it."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    if arch in ("llama", "qwen2"):
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=True,
        )
    elif arch == "gpt2":
        cls = GPT2Config
        kwargs = dict(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_position_embeddings,
        )
    else:
        raise ValueError(f"arch: expected 'llama', 'gpt2' or 'qwen2', got {arch!r}")
    kwargs.update(ids)
    kwargs.update(overrides)
    return cls(**kwargs)


def _seeded(build, seed: int):
    # Initialise from a private RNG stream so building a model never moves the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_causal_lm(arch: str = "llama", tokenizer=None, seed: int = 0, **config_kwargs):
    """A randomly initialised `*ForCausalLM` of the stock class (see `tiny_config` for the sizes)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, tokenizer=tokenizer, **config_kwargs)
    return _seeded(lambda: AutoModelForCausalLM.from_config(config), seed)


def tiny_sequence_classifier(arch: str = "llama", tokenizer=None, seed: int = 0, num_labels: int = 1, **config_kwargs):
    """A randomly initialised `*ForSequenceClassification` (a reward model when num_labels=1)."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_config(arch, tokenizer=tokenizer, num_labels=num_labels, **config_kwargs)
    return _seeded(lambda: AutoModelForSequenceClassification.from_config(config), seed)
