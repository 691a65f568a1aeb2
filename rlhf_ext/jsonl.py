"""JSON lines in and out: the one reader behind training data files, `label pairs` prompts and `label serve` /
`label judge` pairs files. Every problem is a one-line ValueError that names the file and the line, so the CLI can
print it as it is.
"""

import json
from collections.abc import Iterable, Iterator


def decode_line(raw: bytes, path, number: int) -> str:
    """`raw` (one line of `path`, counted from 1) as text; a ValueError naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}, line {number}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})"
        ) from None


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON lines file, read one line at a time (a large file
    is never held in memory whole). Raises ValueError "<path>, line <n>: ..." for bytes that are not UTF-8,
    a line that is not valid JSON, or a line holding something other than a JSON object."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = decode_line(raw, path, number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object per line, got {type(row).__name__}")
            yield number, row


def write_jsonl(rows: Iterable[dict], path) -> None:
    """One JSON object a line, UTF-8 (non-ASCII text kept as it is, not escaped)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
