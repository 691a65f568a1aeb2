"""The real server (`rlhf-ext label serve` under uvicorn, 127.0.0.1, a free port) under concurrent
voters, and killed with SIGKILL in the middle of a burst: no acknowledged vote may be lost. Request
loops are bounded in count and time, and the server process ends by itself after two minutes."""

import sqlite3
import threading
import time

import pytest

httpx = pytest.importorskip("httpx", reason="needs the 'label' extra: pip install 'rlhf_ext[label]'")
pytest.importorskip("uvicorn", reason="needs the 'label' extra: pip install 'rlhf_ext[label]'")

from tests.label_helpers import label_server, write_pairs  # noqa: E402

N_VOTERS = 8
N_ITEMS = 25
CHOICES = ("A", "B", "tie", "skip")


def voter(base, name, acked, errors, stop, deadline):
    """Label until nothing is left, `stop` is set or the deadline passes; records every vote the server
    acknowledged with 2xx as (vote_id, item_id, shown choice)."""
    with httpx.Client(base_url=base, timeout=10.0) as client:
        for n in range(N_ITEMS + 1):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                item = client.post("/api/next", json={"labeller": name}).json()["item"]
                if item is None:
                    return
                vote_id = f"{name}-{n:04d}-{item['id']}"
                choice = CHOICES[(n + len(name)) % 4]
                body = {"vote_id": vote_id, "item_id": item["id"], "labeller": name, "choice": choice}
                response = client.post("/api/vote", json=body)
            except (httpx.TransportError, ValueError):
                return  # the server is gone (kill test) or answered garbage while dying
            if response.status_code // 100 == 2:
                acked.append((vote_id, item["id"], choice))
            else:
                errors.append((name, response.status_code, response.text))
                return


def run_voters(base, stop=None, deadline_s=90):
    acked, errors = [], []
    stop = stop or threading.Event()
    deadline = time.monotonic() + deadline_s
    threads = [
        threading.Thread(target=voter, args=(base, f"voter{i}", acked, errors, stop, deadline)) for i in range(N_VOTERS)
    ]
    for t in threads:
        t.start()
    return threads, acked, errors


def db_votes(db):
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {row[0]: row[1:] for row in conn.execute("SELECT vote_id, item_id, labeller, choice FROM votes")}


def make_pairs(tmp_path):
    items = [(f"it{i:02d}", f"prompt {i}", f"left {i}", f"right {i}") for i in range(N_ITEMS)]
    return write_pairs(tmp_path / "pairs.jsonl", items)


def test_concurrent_voters_lose_nothing(tmp_path):
    db = tmp_path / "fb.sqlite"
    with label_server(make_pairs(tmp_path), db, k=N_VOTERS) as (_, base):
        threads, acked, errors = run_voters(base)
        for t in threads:
            t.join(timeout=100)
        assert not any(t.is_alive() for t in threads)
        progress = httpx.get(base + "/api/progress", params={"labeller": "voter0"}).json()
    assert errors == []
    assert len(acked) == N_VOTERS * N_ITEMS  # everyone labelled every item once
    stored = db_votes(db)
    assert set(stored) == {vote_id for vote_id, _, _ in acked}
    per_labeller = {}
    for item_id, labeller, _ in stored.values():
        per_labeller.setdefault(labeller, []).append(item_id)
    assert all(sorted(items) == [f"it{i:02d}" for i in range(N_ITEMS)] for items in per_labeller.values())
    assert progress["done"] == N_ITEMS and progress["remaining"] == 0


def test_sigkill_mid_burst_keeps_every_acknowledged_vote(tmp_path):
    db = tmp_path / "fb.sqlite"
    stop = threading.Event()
    with label_server(make_pairs(tmp_path), db, k=N_VOTERS) as (proc, base):
        threads, acked, errors = run_voters(base, stop)
        deadline = time.monotonic() + 60
        while len(acked) < 40 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.005)
        proc.kill()  # SIGKILL: no shutdown handler, no flush, while requests are in flight
        proc.wait(timeout=10)
        for t in threads:
            t.join(timeout=30)
        stop.set()
    assert len(acked) >= 40, f"the burst was too short to test anything ({len(acked)} votes, errors {errors})"
    assert len(acked) < N_VOTERS * N_ITEMS, "the server was killed after the burst, not during it"
    stored = db_votes(db)
    lost = [vote_id for vote_id, _, _ in acked if vote_id not in stored]
    assert lost == [], f"{len(lost)} acknowledged votes lost"
    for vote_id, item_id, choice in acked:
        assert stored[vote_id][0] == item_id
        assert (stored[vote_id][2] == "skip") == (choice == "skip")
