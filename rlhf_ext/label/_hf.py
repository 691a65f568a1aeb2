"""Loading a local Hugging Face causal LM and its tokenizer for `label pairs` and `label judge`.
Only local folders: nothing is fetched from a hub."""

import os

DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def load_causal_lm(path, *, device: str = "auto", dtype: str = "auto", padding_side: str = "left"):
    """(model in eval mode on `device`, tokenizer with a pad token and `padding_side`) from a local folder.
    dtype 'auto': bfloat16 on a GPU that supports it, else float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a folder with a Hugging Face checkpoint")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    device = pick_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path!r} has neither a pad nor an eos token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
    model.to(device).eval()
    return model, tokenizer
