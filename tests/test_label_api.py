"""The labelling web app's API through FastAPI's TestClient: serving order and k, votes and their
canonical mapping, idempotency, validation, tokens, and completions that hold HTML/JS."""

import sqlite3

import pytest

pytest.importorskip("fastapi", reason="the web app needs the 'label' extra: pip install 'rlhf_ext[label]'")
from fastapi.testclient import TestClient  # noqa: E402

from rlhf_ext.label.app import is_loopback, resolve_token  # noqa: E402
from rlhf_ext.label.store import FeedbackStore, load_pairs  # noqa: E402
from tests.label_helpers import make_client, vote, write_pairs  # noqa: E402

INJECTION = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def test_serve_vote_and_canonical_choice(tmp_path):
    client, store = make_client(tmp_path, n_items=12, seed=3)
    swaps = []
    for _ in range(12):
        item = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
        row = store.get_item(item["id"])
        assert {item["a"], item["b"]} == {row["completion_a"], row["completion_b"]}
        swapped = item["a"] == row["completion_b"]
        swaps.append(swapped)
        # "A" is whatever was shown first: stored as completion_b's win when the order was swapped
        assert vote(client, item["id"], "ann", "A", rating=5, note="fine").status_code == 201
        stored = store.votes("human")[-1]
        assert (stored["choice"], stored["swapped"], stored["rating"], stored["note"]) == (
            "b" if swapped else "a",
            int(swapped),
            5,
            "fine",
        )
    assert any(swaps) and not all(swaps), "display order must be randomised per item"
    body = client.post("/api/next", json={"labeller": "ann"}).json()
    assert body["item"] is None and body["progress"]["done"] == 12 and body["progress"]["remaining"] == 0


def test_unanswered_item_comes_back_in_the_same_order(tmp_path):
    client, _ = make_client(tmp_path, n_items=3)
    first = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
    again = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
    assert again == first


def test_k_labellers_per_item_and_never_twice(tmp_path):
    client, _ = make_client(tmp_path, n_items=2, k=2)
    seen = {}
    for name in ("ann", "bob", "cy"):
        seen[name] = []
        while (item := client.post("/api/next", json={"labeller": name}).json()["item"]) is not None:
            assert item["id"] not in seen[name], "an item was served twice to one labeller"
            seen[name].append(item["id"])
            assert vote(client, item["id"], name, "tie").status_code == 201
    assert seen == {"ann": ["item0", "item1"], "bob": ["item0", "item1"], "cy": []}


def test_items_held_by_others_count_towards_k_until_their_lease_lapses(tmp_path):
    client, _ = make_client(tmp_path, n_items=1, k=1)
    assert client.post("/api/next", json={"labeller": "ann"}).json()["item"]["id"] == "item0"
    assert client.post("/api/next", json={"labeller": "bob"}).json()["item"] is None  # ann holds it
    client, _ = make_client(tmp_path / "lapsed", n_items=1, k=1, lease_seconds=0.0)
    assert client.post("/api/next", json={"labeller": "ann"}).json()["item"]["id"] == "item0"
    assert client.post("/api/next", json={"labeller": "bob"}).json()["item"]["id"] == "item0"


def test_skip_gives_the_item_to_someone_else(tmp_path):
    client, store = make_client(tmp_path, n_items=1, k=1)
    item = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
    assert vote(client, item["id"], "ann", "skip").status_code == 201
    assert client.post("/api/next", json={"labeller": "ann"}).json()["item"] is None  # never twice
    assert client.post("/api/next", json={"labeller": "bob"}).json()["item"]["id"] == item["id"]
    assert store.votes("human")[0]["choice"] == "skip"


def test_duplicate_submission_is_idempotent(tmp_path):
    client, store = make_client(tmp_path)
    item = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
    first = vote(client, item["id"], "ann", "B", vote_id="click-0001")
    again = vote(client, item["id"], "ann", "B", vote_id="click-0001")  # double click / retry
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["duplicate"] is True and first.json()["stored"] is True
    other = vote(client, item["id"], "ann", "A", vote_id="click-0002")  # a second tab
    assert other.status_code == 409 and "already voted" in other.json()["error"]
    assert len(store.votes()) == 1
    reused = vote(client, "item1", "ann", "A", vote_id="click-0001")
    assert reused.status_code == 409 and "vote_id" in reused.json()["error"]


def test_vote_refusals(tmp_path):
    client, _ = make_client(tmp_path)
    unknown = vote(client, "nope", "ann", "A")
    assert unknown.status_code == 404 and "unknown item_id" in unknown.json()["error"]
    not_served = vote(client, "item2", "ann", "A")
    assert not_served.status_code == 409 and "not served" in not_served.json()["error"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"choice": "C"}, "choice"),
        ({"choice": "a"}, "choice"),
        ({"rating": 0}, "rating"),
        ({"rating": 8}, "rating"),
        ({"rating": "3"}, "rating"),
        ({"rating": 3.5}, "rating"),
        ({"note": "x" * 2001}, "note"),
        ({"labeller": "<b>ann</b>"}, "labeller"),
        ({"labeller": ""}, "labeller"),
        ({"vote_id": "short"}, "vote_id"),
        ({"item_id": "x" * 201}, "item_id"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invalid_votes_get_a_clear_422(tmp_path, change, field):
    client, store = make_client(tmp_path)
    client.post("/api/next", json={"labeller": "ann"})
    body = {"vote_id": "vote-0001", "item_id": "item0", "labeller": "ann", "choice": "A", **change}
    response = client.post("/api/vote", json=body)
    assert response.status_code == 422
    assert field in response.json()["error"]
    assert store.votes() == []


def test_bad_labeller_query_and_non_json_body(tmp_path):
    client, _ = make_client(tmp_path)
    response = client.post("/api/next", json={"labeller": "a" * 65})
    assert response.status_code == 422 and "labeller" in response.json()["error"]
    # a cross-site form post (no JSON content type) is not accepted as a vote
    response = client.post("/api/vote", content="vote_id=x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 422


def test_loopback_rejects_foreign_host_headers(tmp_path):
    client, _ = make_client(tmp_path)
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200


def test_token_required_beyond_loopback(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20") and not is_loopback("example.org")
    assert resolve_token("127.0.0.1", None) == (None, False)
    token, generated = resolve_token("0.0.0.0", None)
    assert generated and len(token) >= 20 and resolve_token("0.0.0.0", None)[0] != token
    assert resolve_token("10.1.2.3", "chosen-token") == ("chosen-token", False)
    with pytest.raises(ValueError, match="at least 8"):
        resolve_token("0.0.0.0", "short")
    with pytest.raises(ValueError, match="token is required"):
        make_client(tmp_path, host="0.0.0.0", token=None)

    client, store = make_client(tmp_path / "remote", host="0.0.0.0", token="s3cret-token")
    assert client.get("/api/health").status_code == 200  # liveness only
    assert client.get("/").status_code == 200  # the page holds no data
    no_token = client.post("/api/next", json={"labeller": "ann"})
    assert no_token.status_code == 401 and "token" in no_token.json()["error"]
    wrong = {"X-Label-Token": "wrong-token!"}
    assert client.post("/api/next", json={"labeller": "ann"}, headers=wrong).status_code == 403
    assert client.get("/api/progress", params={"labeller": "ann"}).status_code == 401
    assert vote(client, "item0", "ann", "A").status_code == 401
    assert vote(client, "item0", "ann", "A", vote_id="vote-0002").status_code == 401
    good = {"X-Label-Token": "s3cret-token"}
    item = client.post("/api/next", json={"labeller": "ann"}, headers=good).json()["item"]
    body = {"vote_id": "vote-0003", "item_id": item["id"], "labeller": "ann", "choice": "A"}
    assert client.post("/api/vote", json=body, headers=wrong).status_code == 403
    assert store.votes() == []
    bearer = {"Authorization": "Bearer s3cret-token"}
    assert client.post("/api/vote", json=body, headers=bearer).status_code == 201
    assert len(store.votes()) == 1


def test_injected_markup_stays_data(tmp_path):
    client, store = make_client(tmp_path, items=[("x", INJECTION, INJECTION + "</pre>", "plain")])
    response = client.post("/api/next", json={"labeller": "ann"})
    assert response.headers["content-type"] == "application/json"
    item = response.json()["item"]
    assert item["prompt"] == INJECTION and INJECTION + "</pre>" in (item["a"], item["b"])
    page = client.get("/")
    assert "<script>window.pwned" not in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    script = client.get("/static/app.js").text
    assert "textContent = item.prompt" in script and "innerHTML" not in script and "eval(" not in script
    # stored byte for byte: escaping is the page's job, not the database's
    assert store.get_item("x")["prompt"] == INJECTION


def test_store_survives_reopen_and_rejects_changed_items(tmp_path):
    client, store = make_client(tmp_path)
    item = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
    vote(client, item["id"], "ann", "tie")
    store.close()
    with sqlite3.connect(tmp_path / "feedback.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0] == 1
    reopened = FeedbackStore(tmp_path / "feedback.sqlite")
    assert reopened.add_items(load_pairs(tmp_path / "pairs.jsonl")) == 0  # same file again: nothing new
    with pytest.raises(ValueError, match="already in .* with other text"):
        reopened.add_items([{"id": "item0", "prompt": "changed", "completion_a": "x", "completion_b": "y"}])


def test_load_pairs_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion_a": "a", "completion_b": "b"}\n{"prompt": "p", "completion_a": 3}\n')
    with pytest.raises(ValueError, match="line 2: expected a string field 'completion_a'"):
        load_pairs(bad)
    bad.write_text(
        '{"id": 1, "prompt": "p", "completion_a": "a", "completion_b": "b"}\n'
        '{"id": "1", "prompt": "q", "completion_a": "a", "completion_b": "b"}\n'
    )
    with pytest.raises(ValueError, match="line 2: duplicate id '1'"):
        load_pairs(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_pairs(bad)


def test_serve_command_generates_a_token_beyond_loopback(tmp_path, monkeypatch, capsys):
    # uvicorn.run is replaced: nothing is bound, we only look at what would be served
    import uvicorn

    from rlhf_ext.cli import main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    pairs = write_pairs(tmp_path / "pairs.jsonl", [("x", "p", "a", "b")])
    argv = ["label", "serve", "--pairs", str(pairs), "--db", str(tmp_path / "fb.sqlite"), "--port", "8123"]
    assert main(argv + ["--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    token = out.split("access token (generated; pass --token to choose one): ")[1].split()[0]
    assert f"open http://0.0.0.0:8123/?token={token}" in out and served["host"] == "0.0.0.0"
    client = TestClient(served["app"])
    assert client.post("/api/next", json={"labeller": "ann"}).status_code == 401
    assert client.post("/api/next", json={"labeller": "ann"}, headers={"X-Label-Token": token}).status_code == 200

    assert main(argv + ["--host", "127.0.0.1"]) == 0
    assert "token" not in capsys.readouterr().out
    assert main(argv + ["--host", "0.0.0.0", "--token", "short"]) == 2
    assert "--token must be at least 8 characters" in capsys.readouterr().err
    assert main(argv + ["--k", "0"]) == 2
    assert "--k must be at least 1" in capsys.readouterr().err
