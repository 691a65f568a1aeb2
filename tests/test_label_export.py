"""Export aggregation and agreement statistics against cases computed by hand."""

import json
import random

import pytest

from rlhf_ext.cli import main
from rlhf_ext.label.export import aggregate, cohen_kappa, majority, pairwise_agreement
from rlhf_ext.label.store import FeedbackStore

# item -> canonical human votes by labeller u1..u4 (None: that labeller skipped it)
HUMAN = {
    "i1": ["a", "a", "a", None],  # a, agreement 1, margin 1
    "i2": ["a", "a", "b", None],  # a, agreement 2/3, margin 1/3
    "i3": ["b", "tie", "b", "a"],  # b, agreement 1/2, margin 1/4
    "i4": ["a", "b", None, None],  # draw -> tie, agreement 1/2
    "i5": ["tie", "tie", "a", None],  # tie, agreement 2/3
    "i6": [None, None, None, None],  # only skips: no votes
    "i7": ["b", None, None, None],  # b, agreement 1, margin 1
    "i8": [],  # never served
}
AI = {"i1": "a", "i2": "b", "i3": "b", "i4": "a", "i5": "tie", "i7": "b", "i8": "a"}
ITEMS = [{"id": i, "prompt": f"P{i}", "completion_a": f"A{i}", "completion_b": f"B{i}"} for i in HUMAN]


def human_votes():
    return [
        {"item_id": item, "labeller": f"u{n + 1}", "choice": choice or "skip"}
        for item, choices in HUMAN.items()
        for n, choice in enumerate(choices)
    ]


def ai_votes():
    return [{"item_id": item, "labeller": "judge:j", "choice": choice} for item, choice in AI.items()]


def by_prompt(rows):
    return {row["prompt"]: row for row in rows}


def test_majority_and_agreement():
    assert majority(["a", "a", "b", "skip"]) == ("a", pytest.approx(2 / 3), {"a": 2, "b": 1})
    assert majority(["a", "b"])[:2] == ("tie", 0.5)
    assert majority(["tie", "tie", "a"])[:2] == ("tie", pytest.approx(2 / 3))
    assert majority(["skip"])[:2] == (None, 0.0)


def test_default_export_drops_ties_and_low_agreement():
    rows, counts = aggregate(ITEMS, human_votes())
    assert by_prompt(rows) == {
        "Pi1": {"prompt": "Pi1", "chosen": "Ai1", "rejected": "Bi1", "margin": 1.0},
        "Pi2": {"prompt": "Pi2", "chosen": "Ai2", "rejected": "Bi2", "margin": pytest.approx(1 / 3)},
        "Pi7": {"prompt": "Pi7", "chosen": "Bi7", "rejected": "Ai7", "margin": 1.0},
    }
    assert (counts["labelled"], counts["no_votes"], counts["low_agreement"], counts["ties_dropped"]) == (6, 2, 2, 1)


def test_ties_kept_marked_as_ties_with_margin_zero():
    rows, counts = aggregate(ITEMS, human_votes(), min_agreement=0.5, ties="keep")
    got = {p: (r["chosen"], r["margin"], r["tie"]) for p, r in by_prompt(rows).items()}
    assert got == {
        "Pi1": ("Ai1", 1.0, False),
        "Pi2": ("Ai2", pytest.approx(1 / 3), False),
        "Pi3": ("Bi3", 0.25, False),
        "Pi4": ("Ai4", 0.0, True),
        "Pi5": ("Ai5", 0.0, True),
        "Pi7": ("Bi7", 1.0, False),
    }
    assert counts["ties_kept"] == 2
    rows, _ = aggregate(ITEMS, human_votes(), min_agreement=0.5)
    assert all("tie" not in r for r in rows)  # ties dropped: the plain TRL columns
    with pytest.raises(ValueError, match="ties: expected 'drop' or 'keep'"):
        aggregate(ITEMS, human_votes(), ties="margin0")


def test_min_votes_and_sources():
    rows, counts = aggregate(ITEMS, human_votes(), min_votes=3)
    assert sorted(by_prompt(rows)) == ["Pi1", "Pi2"]
    assert counts["too_few_votes"] == 2  # i4 and i7
    rows, _ = aggregate(ITEMS, ai_votes())
    assert {p: r["chosen"] for p, r in by_prompt(rows).items()} == {
        "Pi1": "Ai1",
        "Pi2": "Bi2",
        "Pi3": "Bi3",
        "Pi4": "Ai4",
        "Pi7": "Bi7",
        "Pi8": "Ai8",
    }
    rows, _ = aggregate(ITEMS, human_votes() + ai_votes())
    assert "Pi2" not in by_prompt(rows)  # a a b + AI b: a draw, so a tie


def test_pairwise_agreement_by_hand():
    # i1: 3 agreeing pairs of 3; i2: 1 of 3; i3: 1 of 6; i4: 0 of 1; i5: 1 of 3 -> 6 / 16
    assert pairwise_agreement(human_votes()) == (6 / 16, 16, 5)


def test_cohen_kappa_by_hand():
    assert cohen_kappa(list("aabb"), list("abbb")) == (0.5, 0.75, 4)
    assert cohen_kappa(list("ab"), list("ab"))[0] == 1.0
    assert cohen_kappa(list("aa"), list("aa"))[0] is None  # one label only: chance agreement is 1
    assert cohen_kappa([], []) == (None, None, 0)
    with pytest.raises(ValueError, match="one label per item"):
        cohen_kappa(["a"], [])


def test_bad_arguments():
    with pytest.raises(ValueError, match="ties: expected"):
        aggregate(ITEMS, [], ties="tie")
    with pytest.raises(ValueError, match="min_agreement"):
        aggregate(ITEMS, [], min_agreement=1.5)


def fill_store(path):
    """The HUMAN/AI tables above, voted through the store the way the web app does (served item, shown
    order, clicked side)."""
    store = FeedbackStore(path, rng=random.Random(1))
    store.add_items(ITEMS)
    votes = {(item, f"u{n + 1}"): c for item, cs in HUMAN.items() for n, c in enumerate(cs)}
    for labeller in ("u1", "u2", "u3", "u4"):
        while (served := store.next_item(labeller, k=10)) is not None:
            item, swapped = served
            choice = votes.get((item["id"], labeller)) or "skip"
            shown = {"a": "B" if swapped else "A", "b": "A" if swapped else "B"}.get(choice, choice)
            store.record_human_vote(f"vote-{labeller}-{item['id']}", item["id"], labeller, shown)
    for item, choice in AI.items():
        assert store.record_ai_vote(item, "judge:j", choice, 0.8)
    return store


def test_export_command_end_to_end(tmp_path, capsys):
    fill_store(tmp_path / "fb.sqlite")
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", str(tmp_path / "fb.sqlite"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "chosen", "rejected", "margin"}] * 3
    assert {r["prompt"]: r["chosen"] for r in rows} == {"Pi1": "Ai1", "Pi2": "Ai2", "Pi7": "Bi7"}
    printed = capsys.readouterr().out
    assert "exported: 3 rows" in printed
    assert "pairwise agreement among humans: 0.375 over 16 labeller pairs on 5 items" in printed
    # human majority vs AI on i1..i5, i7: (a,a) (a,b) (b,b) (tie,a) (tie,tie) (b,b): po = 4/6,
    # pe = (2*2 + 2*3 + 2*1) / 36 = 1/3, kappa = (2/3 - 1/3) / (2/3) = 0.5
    assert "Cohen's kappa, human majority vs AI: 0.500 over 6 items (observed agreement 0.667)" in printed

    assert (
        main(
            ["label", "export", "--db", str(tmp_path / "fb.sqlite"), "--out", str(out), "--source", "ai", "--with-meta"]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        winner = "a" if row["chosen"].startswith("A") else "b"
        assert (row["agreement"], row["votes"], AI[row["item_id"]]) == (1.0, {winner: 1}, winner)


def test_export_command_errors(tmp_path, capsys):
    assert main(["label", "export", "--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
