"""The labelling tools refuse what is not theirs and bound what one request costs: marked databases (foreign
SQLite files and non-SQLite files are refused by name), pairs files checked line by line, request bodies
capped at 64 KiB, bounded validation replies, and no state change from a GET or a cross-site form."""

import json
import sqlite3

import pytest

pytest.importorskip("fastapi", reason="the web app needs the 'label' extra: pip install 'rlhf_ext[label]'")

from rlhf_ext.cli import main  # noqa: E402
from rlhf_ext.label import app as label_app  # noqa: E402
from rlhf_ext.label.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    FeedbackStore,
    NotAFeedbackDatabase,  # noqa: E402
    load_pairs,
)
from tests.label_helpers import make_client, vote, write_pairs  # noqa: E402


def assert_one_line_exit_2(code, capsys, *fragments):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_new_database_is_marked(tmp_path):
    FeedbackStore(tmp_path / "fb.sqlite").close()
    with sqlite3.connect(tmp_path / "fb.sqlite") as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_export_refuses_a_file_that_is_not_sqlite(tmp_path, capsys):
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"these are my notes, not a database\n" * 10)
    code = main(["label", "export", "--db", str(path), "--out", str(tmp_path / "out.jsonl")])
    assert_one_line_exit_2(code, capsys, "notes.sqlite: not an SQLite database")
    assert path.read_bytes() == b"these are my notes, not a database\n" * 10


def test_export_refuses_another_programs_database_and_leaves_it_alone(tmp_path, capsys):
    path = tmp_path / "shop.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
        conn.execute("INSERT INTO orders (item) VALUES ('tea')")
    before = path.read_bytes()
    code = main(["label", "export", "--db", str(path), "--out", str(tmp_path / "out.jsonl")])
    assert_one_line_exit_2(code, capsys, "shop.sqlite: not an rlhf-ext feedback database (it holds tables orders)")
    assert path.read_bytes() == before  # no tables added, journal mode unchanged
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA application_id = {0x12345678}")
    with pytest.raises(NotAFeedbackDatabase, match="another program: application_id 0x12345678"):
        FeedbackStore(path)


def test_feedback_database_from_before_the_marks_is_adopted(tmp_path):
    """A database written by rlhf_ext before application_id existed (same tables) opens with its votes and is
    marked from then on."""
    client, store = make_client(tmp_path)
    item = client.post("/api/next", json={"labeller": "ann"}).json()["item"]
    assert vote(client, item["id"], "ann", "A").status_code == 201
    store.close()
    with sqlite3.connect(tmp_path / "feedback.sqlite") as conn:
        conn.execute("PRAGMA application_id = 0")
        conn.execute("PRAGMA user_version = 0")
    reopened = FeedbackStore(tmp_path / "feedback.sqlite")
    assert len(reopened.votes()) == 1 and len(reopened.items()) == 4
    with sqlite3.connect(tmp_path / "feedback.sqlite") as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


@pytest.mark.parametrize(
    "row, fragment",
    [
        (("x", "p", "", "b"), "line 2: 'completion_a' is empty"),
        (("x", "p", "a", "  "), "line 2: 'completion_b' is empty"),
        (("x", "p", "same", "same"), "line 2: 'completion_a' and 'completion_b' are identical"),
    ],
)
def test_pairs_refuse_empty_and_identical_completions(row, fragment, tmp_path, capsys):
    path = write_pairs(tmp_path / "pairs.jsonl", [("ok", "p", "a", "b"), row])
    with pytest.raises(ValueError, match=fragment):
        load_pairs(path)
    code = main(["label", "serve", "--pairs", str(path), "--db", str(tmp_path / "fb.sqlite")])
    assert_one_line_exit_2(code, capsys, f"pairs.jsonl, {fragment}")


def test_pairs_name_the_line_of_non_utf8_bytes(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(
        b'{"prompt": "p", "completion_a": "a", "completion_b": "b"}\n'
        b'{"prompt": "p\xe9", "completion_a": "a", "completion_b": "c"}\n'
    )
    code = main(["label", "serve", "--pairs", str(path), "--db", str(tmp_path / "fb.sqlite")])
    assert_one_line_exit_2(code, capsys, "pairs.jsonl, line 2: not UTF-8 text (byte 0xe9")


def test_body_over_the_limit_gets_413_by_content_length(tmp_path):
    client, store = make_client(tmp_path)
    huge = json.dumps({f"k{i}": i for i in range(400_000)})  # ~6.5 MB of keys
    response = client.post("/api/vote", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "too large" in response.json()["error"]
    assert len(response.content) < 200 and store.votes() == []


def test_streamed_body_without_content_length_is_cut_off(tmp_path):
    client, store = make_client(tmp_path)
    sent = []

    def chunks():
        for _ in range(1000):  # 16 MB if it were read in full
            sent.append(1)
            yield b" " * 16384

    response = client.post("/api/vote", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert store.votes() == []


def test_validation_replies_are_bounded(tmp_path):
    client, store = make_client(tmp_path)
    body = {
        "vote_id": "vote-0001",
        "item_id": "item0",
        "labeller": "ann",
        "choice": "A",
        **{f"extra_{i}_" + "x" * 20: i for i in range(1500)},
    }  # ~50 KB, under the body limit
    assert len(json.dumps(body)) < label_app.MAX_BODY
    response = client.post("/api/vote", json=body)
    assert response.status_code == 422
    assert len(response.content) < 8 * 1024, len(response.content)
    assert "and 1490 more" in response.json()["error"]


def test_next_is_not_served_to_a_get_or_a_cross_site_form(tmp_path):
    client, store = make_client(tmp_path)
    assert client.get("/api/next", params={"labeller": "ann"}).status_code == 405  # e.g. an <img src=...>
    form = client.post(
        "/api/next", content="labeller=ann", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert form.status_code == 422
    plain = client.post("/api/next", content='{"labeller": "ann"}', headers={"Content-Type": "text/plain"})
    assert plain.status_code == 422
    assert store.progress("ann", 1)["done"] == 0
    # nothing was leased: bob gets the first item at once
    assert client.post("/api/next", json={"labeller": "bob"}).json()["item"]["id"] == "item0"


def test_sampled_pairs_skip_empty_and_identical_completions():
    from rlhf_ext.label.pairs import make_pairs

    rows, skipped = make_pairs(["p"], [["", "a", " ", "b", "a"]])
    assert sorted((r["completion_a"], r["completion_b"]) for r in rows) == [("a", "b"), ("b", "a")]
    assert skipped == 8  # C(5, 2) = 10 pairs: 7 with an empty side, 1 identical
