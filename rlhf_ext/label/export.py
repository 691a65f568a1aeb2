"""Votes -> preference rows for the reward trainer, plus agreement statistics.

Per item (skips ignored; n = votes for a + votes for b + ties):
  - the majority label is the one of {a, b, tie} with the most votes; a draw at the top (say 1 a, 1 b)
    makes the item a tie;
  - agreement = votes for the majority label / n (for a draw: the top count / n);
  - margin = (votes for the winner - votes for the loser) / n, so 1.0 when unanimous and 0 for ties.
Items with agreement below `min_agreement` or fewer than `min_votes` votes are dropped; ties are dropped
or, with ties="keep", kept as (completion_a, completion_b) rows with margin 0 and `tie: true` (every row then
has a `tie` column), which RewardTrainer trains towards equal rewards instead of a preference.

Rows hold exactly `prompt`, `chosen`, `rejected`, `margin` (what RewardTrainer reads); `with_meta` adds
`item_id`, `agreement` and `votes`.
"""

import itertools
import json
from collections import Counter, defaultdict

LABELS = ("a", "b", "tie")


def majority(choices) -> tuple:
    """(label, agreement, counts) for a list of canonical choices; label is None when there is no vote."""
    counts = Counter(c for c in choices if c in LABELS)
    n = sum(counts.values())
    if n == 0:
        return None, 0.0, counts
    top = max(counts.values())
    leaders = [label for label in LABELS if counts[label] == top]
    label = leaders[0] if len(leaders) == 1 else "tie"
    return label, top / n, counts


def cohen_kappa(first, second, categories=LABELS):
    """Cohen's kappa of two raters over the same items; returns (kappa, observed agreement, n).
    kappa is None when it is undefined (no items, or both raters always gave one and the same label)."""
    if len(first) != len(second):
        raise ValueError(f"both raters need one label per item, got {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        return None, None, 0
    observed = sum(x == y for x, y in zip(first, second)) / n
    count1, count2 = Counter(first), Counter(second)
    expected = sum(count1[c] * count2[c] for c in categories) / (n * n)
    if expected >= 1.0:
        return None, observed, n
    return (observed - expected) / (1.0 - expected), observed, n


def pairwise_agreement(human_votes) -> tuple:
    """Share of (item, labeller pair) combinations where two labellers gave the same non-skip label.
    Returns (agreement or None, number of pairs, number of items with at least two labels)."""
    by_item = defaultdict(dict)
    for vote in human_votes:
        if vote["choice"] in LABELS:
            by_item[vote["item_id"]][vote["labeller"]] = vote["choice"]
    agree = pairs = items = 0
    for labels in by_item.values():
        if len(labels) < 2:
            continue
        items += 1
        for x, y in itertools.combinations(labels.values(), 2):
            pairs += 1
            agree += x == y
    return (agree / pairs if pairs else None), pairs, items


def aggregate(
    items, votes, *, min_agreement: float = 0.6, ties: str = "drop", min_votes: int = 1, with_meta: bool = False
) -> tuple:
    """Rows and counts from item dicts and the votes to use (already filtered by source)."""
    if ties not in ("drop", "keep"):
        raise ValueError(f"ties: expected 'drop' or 'keep', got {ties!r}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    if min_votes < 1:
        raise ValueError(f"min_votes must be at least 1, got {min_votes}")
    choices = defaultdict(list)
    for vote in votes:
        choices[vote["item_id"]].append(vote["choice"])
    rows = []
    counts = Counter()
    for item in items:
        label, agreement, tally = majority(choices.get(item["id"], []))
        n = sum(tally.values())
        if label is None:
            counts["no_votes"] += 1
            continue
        counts["labelled"] += 1
        if n < min_votes:
            counts["too_few_votes"] += 1
            continue
        if agreement < min_agreement:
            counts["low_agreement"] += 1
            continue
        if label == "tie":
            if ties == "drop":
                counts["ties_dropped"] += 1
                continue
            counts["ties_kept"] += 1
            chosen, rejected, margin = item["completion_a"], item["completion_b"], 0.0
        else:
            loser = "b" if label == "a" else "a"
            chosen, rejected = item[f"completion_{label}"], item[f"completion_{loser}"]
            margin = (tally[label] - tally[loser]) / n
        row = {"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "margin": margin}
        if ties == "keep":
            row["tie"] = label == "tie"
        if with_meta:
            row.update(item_id=item["id"], agreement=agreement, votes=dict(tally))
        rows.append(row)
        counts["exported"] += 1
        counts["agreement_sum"] += agreement
    return rows, counts


def agreement_stats(items, human_votes, ai_votes) -> dict:
    """Pairwise agreement among people, and Cohen's kappa between the human majority and the AI
    majority on the items both labelled."""
    agreement, pairs, multi_items = pairwise_agreement(human_votes)
    human, ai = defaultdict(list), defaultdict(list)
    for vote in human_votes:
        human[vote["item_id"]].append(vote["choice"])
    for vote in ai_votes:
        ai[vote["item_id"]].append(vote["choice"])
    first, second = [], []
    for item in items:
        h, _, _ = majority(human.get(item["id"], []))
        a, _, _ = majority(ai.get(item["id"], []))
        if h is not None and a is not None:
            first.append(h)
            second.append(a)
    kappa, observed, n = cohen_kappa(first, second)
    return {
        "pairwise_agreement": agreement,
        "labeller_pairs": pairs,
        "items_with_2plus_labels": multi_items,
        "kappa_human_ai": kappa,
        "human_ai_observed_agreement": observed,
        "human_ai_items": n,
    }


def export(
    store,
    out_path,
    *,
    source: str = "human",
    min_agreement: float = 0.6,
    ties: str = "drop",
    min_votes: int = 1,
    with_meta: bool = False,
) -> dict:
    """Write the preference file and return a summary (counts and agreement statistics)."""
    if source not in ("human", "ai", "all"):
        raise ValueError(f"source must be 'human', 'ai' or 'all', got {source!r}")
    items = store.items()
    human_votes, ai_votes = store.votes("human"), store.votes("ai")
    used = {"human": human_votes, "ai": ai_votes, "all": human_votes + ai_votes}[source]
    rows, counts = aggregate(
        items, used, min_agreement=min_agreement, ties=ties, min_votes=min_votes, with_meta=with_meta
    )
    with open(out_path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {
        "items": len(items),
        "source": source,
        **{k: v for k, v in counts.items() if k != "agreement_sum"},
        "mean_agreement_exported": counts["agreement_sum"] / counts["exported"] if counts["exported"] else None,
    }
    summary.update(agreement_stats(items, human_votes, ai_votes))
    return summary


def format_summary(summary: dict, out_path) -> str:
    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        f"items: {summary['items']}, labelled ({summary['source']} votes): {summary.get('labelled', 0)}",
        f"exported: {summary.get('exported', 0)} rows -> {out_path}"
        f" (mean agreement {num(summary['mean_agreement_exported'])})",
        "dropped: "
        + ", ".join(
            f"{summary.get(key, 0)} {text}"
            for key, text in (
                ("ties_dropped", "ties"),
                ("low_agreement", "below min-agreement"),
                ("too_few_votes", "with too few votes"),
                ("no_votes", "without votes"),
            )
        ),
    ]
    if summary.get("ties_kept"):
        lines.append(f"ties kept (tie=true, margin 0): {summary['ties_kept']}")
    lines.append(
        f"pairwise agreement among humans: {num(summary['pairwise_agreement'])} over "
        f"{summary['labeller_pairs']} labeller pairs on {summary['items_with_2plus_labels']} items"
    )
    lines.append(
        f"Cohen's kappa, human majority vs AI: {num(summary['kappa_human_ai'])} over "
        f"{summary['human_ai_items']} items (observed agreement {num(summary['human_ai_observed_agreement'])})"
    )
    return "\n".join(lines)
