"""`label judge` on a tiny Llama trained here to have a known preference and a known position bias, and
`label pairs` on a tiny local checkpoint. Tokenizers are trained locally; nothing comes from a hub."""

import json
import random
import sqlite3

import pytest
import torch

from rlhf_ext.cli import main
from rlhf_ext.label._hf import load_causal_lm
from rlhf_ext.label.judge import answer_logprobs, check_template, fill, judge_pairs
from rlhf_ext.label.store import load_pairs
from tests.label_helpers import (
    JUDGE_TEMPLATE,
    MARKER,
    judge_example,
    tiny_llama,
    train_marker_judge,
    word_tokenizer,
    write_pairs,
)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marker_judge")
    final_loss = train_marker_judge(folder)
    assert final_loss < 0.1, f"the tiny judge did not learn its task (loss {final_loss})"
    return folder


def marker_items(n_each=4, seed=7):
    """Pairs whose better completion is known: the one holding the marker word (None: neither)."""
    rng, items = random.Random(seed), []
    for k in range(n_each):
        for where in ("a", "b", None):
            prompt, with_marker, _, _ = judge_example(rng, "A")
            _, plain, other_plain, _ = judge_example(rng, None)
            a, b = {"a": (with_marker, plain), "b": (plain, with_marker), None: (plain, other_plain)}[where]
            items.append({"id": f"{where}{k}", "prompt": prompt, "completion_a": a, "completion_b": b, "better": where})
    return items


def test_judge_follows_content_and_cancels_position_bias(judge_dir):
    model, tokenizer = load_causal_lm(str(judge_dir), device="cpu")
    for item, verdict in judge_pairs(model, tokenizer, marker_items(), template=JUDGE_TEMPLATE, batch_size=3):
        if item["better"] is not None:
            assert verdict["choice"] == item["better"] and verdict["confidence"] > 0.9, (item, verdict)
            assert verdict["orders_agree"]
        else:
            # asked once, the judge says "A" whichever completion is first: one order alone would vote
            # for completion_a with confidence > 0.88; both orders together see no preference
            assert verdict["logodds_a_first"] > 2 and verdict["logodds_b_first"] < -2, verdict
            assert verdict["position_bias"] > 2
            assert abs(verdict["p_a"] - 0.5) < 0.1, verdict


def test_answer_logprobs_match_unpadded_forward(judge_dir):
    # left padding with explicit positions must give the same log-probs as each sequence alone, for
    # single- and multi-token answers
    model, tokenizer = load_causal_lm(str(judge_dir), device="cpu")
    texts = ["Q: w1 A: w2 w3 w4 B: w5 w6 w7 Best:", "Q: w1 Best:", "say"]
    answers = (" A", " say hello w3")
    batched = answer_logprobs(model, tokenizer, texts, answers)
    for row, text in enumerate(texts):
        for col, answer in enumerate(answers):
            ids = tokenizer(text)["input_ids"] + tokenizer(answer, add_special_tokens=False)["input_ids"]
            n_answer = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            expected = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_answer, len(ids)))
            assert batched[row, col].item() == pytest.approx(expected, abs=1e-4)
    too_long = answer_logprobs(model, tokenizer, texts, answers, max_length=6)
    assert torch.isnan(too_long[0]).all() and not torch.isnan(too_long[2]).any()


def test_template_filling_is_literal():
    filled = fill("<{prompt}|{response_a}|{response_b}> {other}", "p {response_b}", "x{y}", "z")
    assert filled == "<p {response_b}|x{y}|z> {other}"
    with pytest.raises(ValueError, match="missing {response_b}"):
        check_template("{prompt} {response_a}")


def test_judge_command_writes_ai_votes(judge_dir, tmp_path, capsys):
    items = marker_items(n_each=2, seed=11)
    pairs = write_pairs(
        tmp_path / "pairs.jsonl", [(i["id"], i["prompt"], i["completion_a"], i["completion_b"]) for i in items]
    )
    template = tmp_path / "template.txt"
    template.write_text(JUDGE_TEMPLATE)
    db = tmp_path / "fb.sqlite"
    argv = [
        "label",
        "judge",
        "--pairs",
        str(pairs),
        "--judge",
        str(judge_dir),
        "--db",
        str(db),
        "--template",
        str(template),
        "--device",
        "cpu",
        "--tie-band",
        "0.1",
    ]
    assert main(argv) == 0
    assert "judged 6 pairs (a 2, b 2, tie 2)" in capsys.readouterr().out
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT item_id, labeller, source, choice, confidence, meta FROM votes").fetchall()
    assert len(rows) == 6
    for item_id, labeller, source, choice, confidence, meta in rows:
        assert (labeller, source) == (f"judge:{judge_dir.name}", "ai")
        assert choice == {"a": "a", "b": "b", "N": "tie"}[item_id[0]] and 0.0 <= confidence <= 1.0
        assert set(json.loads(meta)) == {"p_a", "logodds_a_first", "logodds_b_first", "position_bias"}
    assert main(argv) == 0  # a second run only judges what is new
    assert "judged 0 pairs" in capsys.readouterr().out
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out), "--source", "ai"]) == 0
    prefs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(prefs) == 4 and all(MARKER in row["chosen"] and MARKER not in row["rejected"] for row in prefs)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_policy")
    tokenizer = word_tokenizer(folder)
    tiny_llama(tokenizer, seed=3).save_pretrained(folder)
    return folder


def label_pairs(model, prompts, out, *options) -> int:
    """`rlhf-ext label pairs --model MODEL --prompts PROMPTS --out OUT [options]`; its exit code."""
    return main(["label", "pairs", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *options])


def test_pairs_command_samples_reproducible_pairs(policy_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Q: w1 w2", "Q: w3", "say hello w4 w5"]))
    outs = []
    for run in range(2):
        out = tmp_path / f"pairs{run}.jsonl"
        assert (
            label_pairs(
                policy_dir,
                prompts,
                out,
                "--n",
                "3",
                "--max-new-tokens",
                "5",
                "--seed",
                "4",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            )
            == 0
        )
        outs.append(out.read_text())
    assert outs[0] == outs[1], "the same seed must give the same pairs"
    rows = [json.loads(line) for line in outs[0].splitlines()]
    assert 6 <= len(rows) <= 9  # 3 prompts x C(3, 2) pairs, minus identical completions
    assert len(load_pairs(tmp_path / "pairs0.jsonl")) == len(rows)
    for row in rows:
        assert row["prompt"] in ("Q: w1 w2", "Q: w3", "say hello w4 w5")
        assert row["completion_a"] != row["completion_b"]
        assert all(len(c.split()) <= 5 for c in (row["completion_a"], row["completion_b"]))
    assert f"{len(rows)} pairs from 3 prompts x 3 samples" in capsys.readouterr().out
    other = tmp_path / "other.jsonl"
    label_pairs(policy_dir, prompts, other, "--n", "3", "--max-new-tokens", "5", "--seed", "5", "--device", "cpu")
    assert other.read_text() != outs[0]


def test_pairs_command_errors(policy_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "no prompt key"}\n')
    assert label_pairs(policy_dir, prompts, tmp_path / "o.jsonl") == 2
    assert "expected an object with a string 'prompt'" in capsys.readouterr().err
    prompts.write_text('{"prompt": "w1"}\n')
    assert label_pairs(tmp_path / "nowhere", prompts, tmp_path / "o.jsonl") == 2
    assert "not a folder" in capsys.readouterr().err
    assert label_pairs(policy_dir, prompts, tmp_path / "o.jsonl", "--n", "1", "--device", "cpu") == 2
    assert "n must be at least 2" in capsys.readouterr().err
