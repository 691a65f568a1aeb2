"""Shared helpers of the tests/test_label_*.py files: tiny local models, pairs files, a server process."""

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time

import torch

FILLER = [f"w{i}" for i in range(24)]
MARKER = "banana"
SPECIAL = ["<unk>", "<pad>", "<s>", "</s>"]
JUDGE_TEMPLATE = "Q: {prompt} A: {response_a} B: {response_b} Best:"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pairs(path, items):
    """items: list of (id or None, prompt, completion_a, completion_b)."""
    with open(path, "w", encoding="utf-8") as f:
        for item_id, prompt, a, b in items:
            row = {"prompt": prompt, "completion_a": a, "completion_b": b}
            if item_id is not None:
                row["id"] = item_id
            f.write(json.dumps(row) + "\n")
    return path


def word_tokenizer(folder):
    """A word-level tokenizer trained locally with `tokenizers` on the test vocabulary, saved as a
    Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = [" ".join(FILLER + [MARKER, "Q:", "A:", "B:", "Best:", "A", "B", "say", "hello"])] * 4
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return fast


def tiny_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def judge_example(rng, marker_slot):
    """(prompt, response in slot A, response in slot B, right answer). The judge is taught: the slot
    holding the marker word wins; with no marker it answers "A" (a pure position bias)."""
    prompt = " ".join(rng.choice(FILLER) for _ in range(2))
    first = [rng.choice(FILLER) for _ in range(3)]
    second = [rng.choice(FILLER) for _ in range(3)]
    if marker_slot == "A":
        first[rng.randrange(3)] = MARKER
    elif marker_slot == "B":
        second[rng.randrange(3)] = MARKER
    return prompt, " ".join(first), " ".join(second), "B" if marker_slot == "B" else "A"


def train_marker_judge(folder, steps=80, seed=0):
    """Train a tiny Llama to answer the judge template as judge_example says; save it with its tokenizer."""
    tokenizer = word_tokenizer(folder)
    model = tiny_llama(tokenizer, seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    answer_ids = {a: tokenizer.convert_tokens_to_ids(a) for a in ("A", "B")}
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and the CI box is shared
    try:
        loss = _train_steps(model, tokenizer, optimizer, rng, answer_ids, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    return loss


def _train_steps(model, tokenizer, optimizer, rng, answer_ids, steps):
    for _ in range(steps):
        texts, targets = [], []
        for _ in range(48):
            prompt, first, second, answer = judge_example(rng, rng.choice(["A", "B", None]))
            texts.append(
                JUDGE_TEMPLATE.replace("{prompt}", prompt)
                .replace("{response_a}", first)
                .replace("{response_b}", second)
            )
            targets.append(answer_ids[answer])
        input_ids = torch.tensor([tokenizer(t)["input_ids"] for t in texts])  # (48, 14): fixed length
        logits = model(input_ids=input_ids).logits[:, -1]  # (48, V)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def label_server(pairs, db, *, k=1, lifetime_s=120, extra=()):
    """`rlhf-ext label serve` in a child process on 127.0.0.1 and a free port; the child exits by itself
    after `lifetime_s` whatever happens to the test. Yields (process, base URL)."""
    import httpx

    port = free_port()
    argv = [
        "label",
        "serve",
        "--pairs",
        str(pairs),
        "--db",
        str(db),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--k",
        str(k),
        *extra,
    ]
    code = (
        f"import os, sys, threading; threading.Timer({lifetime_s:d}, os._exit, (3,)).start(); "
        f"from rlhf_ext.cli import main; sys.exit(main({argv!r}))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"label server exited early: {proc.stdout.read().decode(errors='replace')}")
            try:
                if httpx.get(base + "/api/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("label server did not come up within 60 s")
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def make_client(tmp_path, n_items=4, k=1, seed=0, lease_seconds=600.0, host="127.0.0.1", token=None, items=None):
    """(FastAPI TestClient, FeedbackStore) of the labelling app over a fresh database of `n_items` pairs (or
    `items`: (id, prompt, completion_a, completion_b) tuples). Needs the 'label' extra (fastapi)."""
    from fastapi.testclient import TestClient

    from rlhf_ext.label.app import create_app
    from rlhf_ext.label.store import FeedbackStore, load_pairs

    items = items or [(f"item{i}", f"prompt {i}", f"first {i}", f"second {i}") for i in range(n_items)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = FeedbackStore(tmp_path / "feedback.sqlite", lease_seconds=lease_seconds, rng=random.Random(seed))
    store.add_items(load_pairs(write_pairs(tmp_path / "pairs.jsonl", items)))
    app = create_app(store, k=k, host=host, token=token)
    return TestClient(app, base_url="http://127.0.0.1"), store


def vote(client, item_id, labeller, choice, vote_id=None, **extra):
    """POST /api/vote with a vote id derived from the labeller and the item unless one is given."""
    body = {
        "vote_id": vote_id or f"v-{labeller}-{item_id}".replace(" ", "_"),
        "item_id": item_id,
        "labeller": labeller,
        "choice": choice,
        **extra,
    }
    return client.post("/api/vote", json=body)
