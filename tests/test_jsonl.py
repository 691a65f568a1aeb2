"""The one JSON lines reader (rlhf_ext/jsonl.py): rows with their line numbers, one-line errors naming the
file and the line, and the same errors reached through each of its three callers."""

import pytest

from rlhf_ext.jsonl import read_jsonl, write_jsonl
from rlhf_ext.label.pairs import load_prompts
from rlhf_ext.label.store import load_pairs
from rlhf_ext.trainers.data import _json_records


def test_rows_keep_their_line_numbers_and_round_trip(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl([{"prompt": "é"}, {"prompt": "b", "n": 2}], path)
    assert path.read_text(encoding="utf-8") == '{"prompt": "é"}\n{"prompt": "b", "n": 2}\n'
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


# Line 1 is a row every caller accepts (a prompt for `label pairs`, a pair for `label serve`).
GOOD = b'{"prompt": "p", "completion_a": "a", "completion_b": "b"}\n'
BAD_LINE_2 = {
    "not utf-8": (GOOD + b'{"prompt": "\xff"}\n', r"line 2: not UTF-8 text \(byte 0xff at column 13\)"),
    "bad json": (GOOD + b'{"prompt": x}\n', r"line 2: not valid JSON \(Expecting value, column 12\)"),
    "not an object": (GOOD + b'["b"]\n', "line 2: expected a JSON object per line, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINE_2))
@pytest.mark.parametrize("reader", [lambda p: list(read_jsonl(p)), load_prompts, load_pairs, _json_records])
def test_every_reader_names_file_and_line(case, reader, tmp_path):
    path = tmp_path / "data.jsonl"
    content, message = BAD_LINE_2[case]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="data.jsonl, " + message) as err:
        reader(str(path))
    assert "\n" not in str(err.value)
