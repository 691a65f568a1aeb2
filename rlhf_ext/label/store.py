"""SQLite storage for preference feedback: the items (prompt + two completions), which item was shown to
which labeller in which order, and the votes of people and AI judges side by side.

Durability: WAL journal with `synchronous=FULL`, and each vote is its own `BEGIN IMMEDIATE ... COMMIT`;
the web app answers 2xx only after the commit returned, so a vote that was acknowledged survives the server
being killed. Every public method opens its own transaction, so one store may be shared by many threads
(each thread gets its own connection).

Choices are stored canonically: 'a' means `completion_a` of the pairs file is better, whatever side the
labeller saw it on; `swapped` records the side (1: completion_b was shown first, as "A").
"""

import hashlib
import json
import random
import sqlite3
import threading
import time

from rlhf_ext.jsonl import read_jsonl

CHOICES = ("a", "b", "tie", "skip")
# Marks in the SQLite header (PRAGMA application_id / user_version) that say "an rlhf-ext feedback database,
# schema 1", so a database of another program is refused rather than gaining our tables.
APPLICATION_ID = 0x524C4846  # "RLHF"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    completion_a TEXT NOT NULL,
    completion_b TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id),
    labeller TEXT NOT NULL,
    swapped INTEGER NOT NULL CHECK (swapped IN (0, 1)),
    served_at REAL NOT NULL,
    PRIMARY KEY (item_id, labeller)
);
CREATE TABLE IF NOT EXISTS votes (
    vote_id TEXT PRIMARY KEY,
    item_id TEXT NOT NULL REFERENCES items(id),
    labeller TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('human', 'ai')),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
    swapped INTEGER CHECK (swapped IS NULL OR swapped IN (0, 1)),
    rating INTEGER CHECK (rating IS NULL OR rating BETWEEN 1 AND 7),
    note TEXT NOT NULL DEFAULT '',
    confidence REAL CHECK (confidence IS NULL OR confidence BETWEEN 0 AND 1),
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    UNIQUE (item_id, labeller, source)
);
CREATE INDEX IF NOT EXISTS items_by_position ON items(position);
CREATE INDEX IF NOT EXISTS votes_by_labeller ON votes(labeller, source);
CREATE INDEX IF NOT EXISTS assignments_by_labeller ON assignments(labeller);
"""

_TABLE_COLUMNS = {
    "items": {"id", "position", "prompt", "completion_a", "completion_b"},
    "assignments": {"item_id", "labeller", "swapped", "served_at"},
    "votes": {
        "vote_id",
        "item_id",
        "labeller",
        "source",
        "choice",
        "swapped",
        "rating",
        "note",
        "confidence",
        "meta",
        "created_at",
    },
}

# Human votes that count towards an item's k labellers (a skip gives the item back to the others).
_COUNTED = "SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id AND v.source = 'human' AND v.choice != 'skip'"
# Items someone else holds right now (served within the lease, not yet answered).
_HELD = (
    "SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND a.labeller != :labeller "
    "AND a.served_at > :fresh_after AND NOT EXISTS (SELECT 1 FROM votes w WHERE w.item_id = a.item_id "
    "AND w.labeller = a.labeller AND w.source = 'human')"
)
_NOT_VOTED = (
    "NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.labeller = :labeller AND v.source = 'human')"
)
_NEEDS_LABELS = f"{_NOT_VOTED} AND ({_COUNTED}) + ({_HELD}) < :k"


class StoreError(ValueError):
    """A request the store refuses; `status` is the HTTP status the web app answers with."""

    status = 400


class NotAFeedbackDatabase(StoreError):
    """The file is not SQLite, or an SQLite database of another program."""


class UnknownItem(StoreError):
    status = 404


class Conflict(StoreError):
    status = 409


def item_id_for(prompt: str, completion_a: str, completion_b: str) -> str:
    """Stable id of a pair without one: the same pair gets the same id on every load."""
    digest = hashlib.sha256(json.dumps([prompt, completion_a, completion_b]).encode()).hexdigest()
    return digest[:16]


def load_pairs(path) -> list:
    """Read a pairs file: JSON lines with `prompt`, `completion_a`, `completion_b` (strings) and an
    optional `id`. Returns a list of dicts with those four keys; raises ValueError naming the line."""
    items, seen = [], set()
    for line_no, row in read_jsonl(path):
        where = f"{path}, line {line_no}"
        for key in ("prompt", "completion_a", "completion_b"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where}: expected a string field {key!r}, got {row.get(key)!r:.60}")
        for key in ("completion_a", "completion_b"):
            if not row[key].strip():
                raise ValueError(f"{where}: {key!r} is empty (there is nothing to compare)")
        if row["completion_a"] == row["completion_b"]:
            raise ValueError(f"{where}: 'completion_a' and 'completion_b' are identical (there is nothing to choose)")
        item_id = row.get("id")
        if item_id is None:
            item_id = item_id_for(row["prompt"], row["completion_a"], row["completion_b"])
        elif not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
            raise ValueError(f"{where}: 'id' must be a non-empty string or an integer, got {item_id!r}")
        item_id = str(item_id)
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(
            {
                "id": item_id,
                "prompt": row["prompt"],
                "completion_a": row["completion_a"],
                "completion_b": row["completion_b"],
            }
        )
    if not items:
        raise ValueError(f"{path}: no pairs found")
    return items


class FeedbackStore:
    """One SQLite feedback database. `lease_seconds`: how long an item served to a labeller stays
    reserved for them (counts towards its k) before others may take it."""

    def __init__(self, path, lease_seconds: float = 600.0, rng=None):
        self.path = str(path)
        self.lease_seconds = float(lease_seconds)
        self._rng = rng or random.SystemRandom()
        self._local = threading.local()
        try:
            conn = self._conn()
            self._check_marks(conn)  # before anything writes to the file
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as err:
            self.close()
            raise NotAFeedbackDatabase(f"{self.path}: not an SQLite database ({err})") from None
        except NotAFeedbackDatabase:
            self.close()
            raise
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); use a local disk")
        with self._transaction() as conn:
            if self._check_marks(conn) == "new":
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_marks(self, conn) -> str:
        """ "ours", or "new" for an empty database or one of ours from before the marks (same tables and
        columns: it is adopted and marked); raises NotAFeedbackDatabase naming the file for anything else."""
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if application_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise NotAFeedbackDatabase(
                    f"{self.path}: feedback database schema {version} is newer than this "
                    f"rlhf_ext reads ({SCHEMA_VERSION}); upgrade rlhf_ext"
                )
            return "ours"
        if application_id != 0:
            raise NotAFeedbackDatabase(
                f"{self.path}: not an rlhf-ext feedback database (it belongs to another "
                f"program: application_id {application_id:#x})"
            )
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return "new"
        if tables == set(_TABLE_COLUMNS) and all(
            {row[1] for row in conn.execute(f"PRAGMA table_info({table})")} == columns
            for table, columns in _TABLE_COLUMNS.items()
        ):
            return "new"  # written by rlhf_ext before the marks: CREATE ... IF NOT EXISTS keeps its rows
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise NotAFeedbackDatabase(
            f"{self.path}: not an rlhf-ext feedback database (it holds tables {listed}); "
            "use a new file or one written by `rlhf-ext label`"
        )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per operation
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                self.conn = store._conn()
                self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
                return self.conn

            def __exit__(self, exc_type, exc, tb):
                self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
                return False

        return _Tx()

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- items -------------------------------------------------------------------------------------
    def add_items(self, items) -> int:
        """Insert pairs (dicts as returned by `load_pairs`); ids already present must hold the same
        text. Returns how many were new."""
        added = 0
        with self._transaction() as conn:
            position = conn.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM items").fetchone()[0]
            for item in items:
                old = conn.execute(
                    "SELECT prompt, completion_a, completion_b FROM items WHERE id = ?", (item["id"],)
                ).fetchone()
                if old is None:
                    conn.execute(
                        "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                        (item["id"], position, item["prompt"], item["completion_a"], item["completion_b"]),
                    )
                    position += 1
                    added += 1
                elif tuple(old) != (item["prompt"], item["completion_a"], item["completion_b"]):
                    raise ValueError(
                        f"item id {item['id']!r} is already in {self.path} with other text; "
                        "give changed pairs new ids (or use a new database)"
                    )
        return added

    def items(self) -> list:
        rows = self._conn().execute("SELECT * FROM items ORDER BY position").fetchall()
        return [dict(r) for r in rows]

    def get_item(self, item_id: str) -> dict:
        row = self._conn().execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownItem(f"unknown item_id {item_id!r}")
        return dict(row)

    # ---- serving -----------------------------------------------------------------------------------
    def next_item(self, labeller: str, k: int):
        """The item `labeller` should answer next, with the side each completion is shown on, or None when
        nothing is left for them. An unanswered item already served to them comes back (same order);
        otherwise the first item in file order they have not answered and that fewer than k others
        have answered or currently hold. Returns (item dict, swapped)."""
        now = time.time()
        params = {"labeller": labeller, "k": int(k), "fresh_after": now - self.lease_seconds}
        with self._transaction() as conn:
            held = conn.execute(
                "SELECT a.item_id, a.swapped, a.served_at FROM assignments a WHERE a.labeller = :labeller "
                "AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = a.item_id AND v.labeller = :labeller "
                "AND v.source = 'human') ORDER BY a.served_at",
                params,
            ).fetchall()
            for row in held:
                still_needed = conn.execute(
                    f"SELECT 1 FROM items i WHERE i.id = :item AND {_NEEDS_LABELS}", {**params, "item": row["item_id"]}
                ).fetchone()
                if row["served_at"] > params["fresh_after"] or still_needed:
                    conn.execute(
                        "UPDATE assignments SET served_at = ? WHERE item_id = ? AND labeller = ?",
                        (now, row["item_id"], labeller),
                    )
                    return self._item_in(conn, row["item_id"]), bool(row["swapped"])
                # the lease lapsed and others completed the item meanwhile: release it
                conn.execute("DELETE FROM assignments WHERE item_id = ? AND labeller = ?", (row["item_id"], labeller))
            row = conn.execute(
                f"SELECT i.id FROM items i WHERE {_NEEDS_LABELS} ORDER BY i.position LIMIT 1", params
            ).fetchone()
            if row is None:
                return None
            swapped = self._rng.random() < 0.5
            conn.execute(
                "INSERT OR REPLACE INTO assignments VALUES (?, ?, ?, ?)", (row["id"], labeller, int(swapped), now)
            )
            return self._item_in(conn, row["id"]), swapped

    @staticmethod
    def _item_in(conn, item_id):
        return dict(conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone())

    def progress(self, labeller: str, k: int) -> dict:
        """Counts for the progress bar: answered by this labeller, still open to them, overall."""
        params = {"labeller": labeller, "k": int(k), "fresh_after": time.time() - self.lease_seconds}
        conn = self._conn()
        done = conn.execute(
            "SELECT COUNT(*) FROM votes WHERE labeller = ? AND source = 'human'", (labeller,)
        ).fetchone()[0]
        remaining = conn.execute(f"SELECT COUNT(*) FROM items i WHERE {_NEEDS_LABELS}", params).fetchone()[0]
        total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        complete = conn.execute(f"SELECT COUNT(*) FROM items i WHERE ({_COUNTED}) >= ?", (int(k),)).fetchone()[0]
        return {"done": done, "remaining": remaining, "items": total, "items_complete": complete, "k": int(k)}

    # ---- votes -------------------------------------------------------------------------------------
    def record_human_vote(
        self, vote_id: str, item_id: str, labeller: str, shown_choice: str, rating=None, note: str = ""
    ) -> tuple:
        """Store one human vote in its own transaction. `shown_choice` is what the labeller clicked:
        'A' (the completion shown first), 'B', 'tie' or 'skip'; it is mapped through the recorded display
        order. A repeated `vote_id` (double click, retry) returns the stored vote with duplicate=True.
        Returns (vote dict, duplicate)."""
        if shown_choice not in ("A", "B", "tie", "skip"):
            raise StoreError(f"choice must be one of 'A', 'B', 'tie', 'skip', got {shown_choice!r}")
        with self._transaction() as conn:
            old = conn.execute("SELECT * FROM votes WHERE vote_id = ?", (vote_id,)).fetchone()
            if old is not None:
                if (old["item_id"], old["labeller"], old["source"]) != (item_id, labeller, "human"):
                    raise Conflict(f"vote_id {vote_id!r} was already used for another item or labeller")
                return dict(old), True
            if conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise UnknownItem(f"unknown item_id {item_id!r}")
            shown = conn.execute(
                "SELECT swapped FROM assignments WHERE item_id = ? AND labeller = ?", (item_id, labeller)
            ).fetchone()
            if shown is None:
                raise Conflict(f"item {item_id!r} was not served to labeller {labeller!r}; ask /api/next first")
            if conn.execute(
                "SELECT 1 FROM votes WHERE item_id = ? AND labeller = ? AND source = 'human'", (item_id, labeller)
            ).fetchone():
                raise Conflict(f"labeller {labeller!r} already voted on item {item_id!r}")
            swapped = bool(shown["swapped"])
            choice = {"A": "b" if swapped else "a", "B": "a" if swapped else "b"}.get(shown_choice, shown_choice)
            conn.execute(
                "INSERT INTO votes (vote_id, item_id, labeller, source, choice, swapped, rating, note, created_at) "
                "VALUES (?, ?, ?, 'human', ?, ?, ?, ?, ?)",
                (vote_id, item_id, labeller, choice, int(swapped), rating, note, time.time()),
            )
            return dict(conn.execute("SELECT * FROM votes WHERE vote_id = ?", (vote_id,)).fetchone()), False

    def record_ai_vote(
        self, item_id: str, judge: str, choice: str, confidence: float, meta=None, overwrite: bool = False
    ) -> bool:
        """Store (or with `overwrite`, replace) the vote of AI judge `judge` on an item, in canonical
        terms. Returns False when the judge had already voted and `overwrite` is off."""
        if choice not in ("a", "b", "tie"):
            raise StoreError(f"AI choice must be 'a', 'b' or 'tie', got {choice!r}")
        if not 0.0 <= confidence <= 1.0:
            raise StoreError(f"confidence must be in [0, 1], got {confidence}")
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
                raise UnknownItem(f"unknown item_id {item_id!r}")
            exists = conn.execute(
                "SELECT 1 FROM votes WHERE item_id = ? AND labeller = ? AND source = 'ai'", (item_id, judge)
            ).fetchone()
            if exists and not overwrite:
                return False
            conn.execute("DELETE FROM votes WHERE item_id = ? AND labeller = ? AND source = 'ai'", (item_id, judge))
            conn.execute(
                "INSERT INTO votes (vote_id, item_id, labeller, source, choice, confidence, meta, created_at) "
                "VALUES (?, ?, ?, 'ai', ?, ?, ?, ?)",
                (
                    f"ai:{judge}:{item_id}",
                    item_id,
                    judge,
                    choice,
                    float(confidence),
                    json.dumps(meta or {}),
                    time.time(),
                ),
            )
        return True

    def votes(self, source: str = "all") -> list:
        """All votes (dicts), oldest first; `source` is 'human', 'ai' or 'all'."""
        if source not in ("human", "ai", "all"):
            raise ValueError(f"source must be 'human', 'ai' or 'all', got {source!r}")
        where, args = ("", ()) if source == "all" else ("WHERE source = ?", (source,))
        rows = self._conn().execute(f"SELECT * FROM votes {where} ORDER BY created_at, vote_id", args).fetchall()
        return [dict(r) for r in rows]
