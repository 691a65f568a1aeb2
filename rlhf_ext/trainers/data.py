"""Datasets for the trainers: loading, prompt/chat tokenisation, padding, and resumable batch order."""

import math
from typing import Optional

import torch

from rlhf_ext.jsonl import decode_line, read_jsonl


def is_conversational(value) -> bool:
    """A list of {"role": ..., "content": ...} messages."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def require_pad_token(tokenizer, what: str = "processing_class"):
    if tokenizer is None:
        raise ValueError(f"{what}: a tokenizer is required (pass processing_class=AutoTokenizer.from_pretrained(...))")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"{what}: the tokenizer has no pad token. Set one before building the trainer, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token` (padding is always masked, so reusing EOS is safe), or add "
            "a new one with `tokenizer.add_special_tokens({'pad_token': '<pad>'})` and "
            "`model.resize_token_embeddings(len(tokenizer))`."
        )


def _is_utf8(text: str) -> bool:
    """False for strings holding lone surrogates (bytes that were not UTF-8, decoded with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_dataset(data, name: str):
    """A `datasets.Dataset` from a Dataset, a list of row dicts or a dict of columns."""
    import datasets

    if data is None:
        return None
    if isinstance(data, datasets.DatasetDict):
        raise ValueError(f"{name}: got a DatasetDict with splits {list(data)}; pass one split, e.g. dataset['train']")
    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, list):
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise TypeError(f"{name}: row {index}: expected a dict of column: value, got {type(row).__name__}")
            for column, value in row.items():
                if isinstance(value, str) and not _is_utf8(value):
                    raise ValueError(f"{name}: row {index}: column {column!r} is not valid UTF-8 text")
        return datasets.Dataset.from_list(data)
    if isinstance(data, dict):
        return datasets.Dataset.from_dict(data)
    raise TypeError(
        f"{name}: expected a datasets.Dataset, a list of dicts or a dict of columns, got {type(data).__name__}"
    )


def _check_finite_row(row: dict, where: str):
    """NaN/Infinity literals in JSON: some readers keep them, others turn them into null; refuse both."""
    for column, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: column {column!r} is {value} (numbers must be finite)")


def _json_records(path: str) -> list:
    """Line numbers of the records in a JSON lines file (or a .json file holding JSON lines or one JSON
    value), checked here so a bad file is named with its line: non-UTF-8 bytes, invalid JSON, a non-object.
    JSON lines are read one line at a time (a large file is never held in memory twice)."""
    import json

    if path.lower().endswith(".json"):
        with open(path, "rb") as fh:
            text = "".join(decode_line(raw, path, number) for number, raw in enumerate(fh, 1))
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a .json file of JSON lines, checked below
                raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        else:
            if isinstance(value, list):
                for index, row in enumerate(value):
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}, row {index}: expected a JSON object, got {type(row).__name__}")
                    _check_finite_row(row, f"{path}, row {index}")
                return [0] * len(value)  # one JSON document: rows have no line of their own
            if isinstance(value, dict):
                return [0]
            raise ValueError(f"{path}: expected JSON objects (rows), got a JSON {type(value).__name__}")
    lines = []
    for number, row in read_jsonl(path):
        _check_finite_row(row, f"{path}, line {number}")
        lines.append(number)
    return lines


def check_finite_columns(data, where) -> None:
    """Refuse NaN and +-inf in the floating-point columns of `data`. `where(i)` names row i (counted from 0,
    as `dataset[i]`; a JSON lines file names the line instead)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    floats = [name for name, feature in data.features.items() if str(getattr(feature, "dtype", "")).startswith("float")]
    if not floats:
        return
    table = data.with_format("arrow")[:]  # a zero-copy pyarrow.Table view of the rows
    for name in floats:
        column = table.column(name)
        if not pa.types.is_floating(column.type):
            continue
        finite = pc.fill_null(pc.is_finite(column), True)
        bad = pc.index(finite, False).as_py()
        if bad >= 0:
            raise ValueError(f"{where(bad)}: column {name!r} is {column[bad].as_py()} (numbers must be finite)")


def load_local_dataset(path: str, split: str = "train"):
    """A dataset from a local .jsonl/.json/.parquet/.csv file, a `save_to_disk` folder, or a folder of data files.
    Unreadable rows, an empty file and non-finite numbers are refused naming the file and line or row."""
    import os

    import datasets

    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset: {path!r} does not exist (only local files and folders are supported)")
    lines = None
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            data = datasets.load_from_disk(path)
        else:
            data = datasets.load_dataset(path)
    else:
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if builder is None:
            raise ValueError(
                f"dataset: {path!r} has an unsupported extension; expected .jsonl, .json, .parquet or .csv"
            )
        if builder == "json":
            lines = _json_records(path)
        if os.path.getsize(path) == 0 or lines == []:
            raise ValueError(f"dataset: {path} holds no rows")
        try:
            data = datasets.load_dataset(builder, data_files={split: path})
        except Exception as err:  # the builders' own errors (pyarrow, pandas, StopIteration) do not name the file
            raise ValueError(f"dataset: {path} could not be read as {ext} ({type(err).__name__}: {err})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset: {path!r} has splits {list(data)}, not {split!r}")
        data = data[split]
    if len(data) == 0:
        raise ValueError(f"dataset: {path} holds no rows" + (f" in split {split!r}" if os.path.isdir(path) else ""))

    def where(row: int) -> str:
        if lines and row < len(lines) and lines[row]:
            return f"{path}, line {lines[row]}"
        return f"{path}, row {row}"

    check_finite_columns(data, where)
    return data


def chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("processing_class: the data holds chat messages but the tokenizer has no chat_template")
    out = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def text_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def prompt_ids(tokenizer, prompt, max_prompt_length: Optional[int] = None) -> list:
    """Token ids of one prompt: text, or chat messages rendered with the generation prompt. Long prompts
    keep their last `max_prompt_length` tokens (the end is what the completion continues)."""
    ids = chat_ids(tokenizer, prompt, True) if is_conversational(prompt) else text_ids(tokenizer, prompt)
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        ids = ids[-max_prompt_length:]
    return ids


def tokenize_prompts(dataset, tokenizer, max_prompt_length=None, num_proc=None, name="train_dataset"):
    """Adds `input_ids` from the `prompt` column (or checks pre-tokenized `input_ids`)."""
    columns = dataset.column_names
    if "prompt" in columns:

        def tokenize(row, index):
            prompt = row["prompt"]
            if not (isinstance(prompt, str) or is_conversational(prompt)):
                raise ValueError(
                    f"{name}: row {index}: column 'prompt' must be text or chat messages, got {type(prompt).__name__}"
                )
            ids = prompt_ids(tokenizer, prompt, max_prompt_length)
            if not ids:  # generation needs at least one token to continue
                raise ValueError(f"{name}: row {index}: column 'prompt' is empty (it gives no tokens)")
            return {"input_ids": ids}

        return dataset.map(tokenize, with_indices=True, num_proc=num_proc)
    if "input_ids" in columns:
        if max_prompt_length is not None:
            return dataset.map(lambda row: {"input_ids": row["input_ids"][-max_prompt_length:]}, num_proc=num_proc)
        return dataset
    raise ValueError(
        f"{name}: expected a 'prompt' column (text or chat messages) or pre-tokenized 'input_ids'; "
        f"got columns {columns}"
    )


def pad(sequences: list, pad_value: int, side: str, device=None):
    """Pad lists of ids to one length. Returns (ids [B, L] long, mask [B, L] long)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


class StepBatches:
    """Row indices of the batch at any step, as a pure function of (seed, step): epochs are permutations
    (epoch e uses seed + e), concatenated and cut into `batch_size` slices; a partial tail of an epoch is
    dropped. Resuming needs only the step number."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_rows < batch_size:
            raise ValueError(f"dataset: {num_rows} rows is fewer than one batch of {batch_size}")
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.batches_per_epoch = num_rows // batch_size
        self._epoch, self._order = None, None

    def indices(self, step: int) -> list:
        epoch, within = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self.num_rows, generator=generator).tolist()
            else:
                self._order = list(range(self.num_rows))
            self._epoch = epoch
        return self._order[within * self.batch_size : (within + 1) * self.batch_size]

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        if max_steps and max_steps > 0:
            return int(max_steps)
        return max(1, math.ceil(num_train_epochs * self.batches_per_epoch))


def prepare_dataset(data, name: str, tokenize):
    """`tokenize(dataset, name)` of `data` as a datasets.Dataset (None stays None; an empty one is refused; NaN/inf
    in a numeric column is refused, naming the row, so that it never reaches a loss)."""
    data = as_dataset(data, name)
    if data is None:
        return None
    if len(data) == 0:
        raise ValueError(f"{name}: is empty")
    check_finite_columns(data, lambda row: f"{name}: row {row}")
    return tokenize(data, name)
