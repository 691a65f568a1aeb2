"""Reading a trainer config from a YAML file and `--key value` pairs: the strings and YAML values are converted to
each config field's type here (`coerce`), so the config classes only ever check typed values."""

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from typing import Any, Union

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


def _parse_scalar(text: str):
    """A command-line or YAML string as the value it spells: bool, None, int, float, list/dict, else str."""
    low = text.strip().lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null", "~"):
        return None
    if _INT.match(text.strip()):
        return int(text)
    if _FLOAT.match(text.strip()):
        return float(text)
    if text.strip()[:1] in ("[", "{"):
        import yaml

        return yaml.safe_load(text)
    return text


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def coerce(value, tp, name: str):
    """Convert `value` (from YAML or the command line) to the field type `tp`; raise naming `name`."""
    if tp is Any or tp is typing.Any:
        return value
    if _is_union(tp):
        members = typing.get_args(tp)
        parsed = _parse_scalar(value) if isinstance(value, str) else value
        if parsed is None and type(None) in members:
            return None
        for member in members:  # an exact type match first, then conversions
            if (
                member is not type(None)
                and typing.get_origin(member) is None
                and isinstance(member, type)
                and isinstance(parsed, member)
                and not (member is int and isinstance(parsed, bool))
            ):
                return parsed
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member, name)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{name}: cannot read {value!r} as {tp}")
    origin = typing.get_origin(tp)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    parsed = _parse_scalar(value) if isinstance(value, str) else value
    if tp is bool:
        if isinstance(parsed, bool):
            return parsed
        if parsed in (0, 1):
            return bool(parsed)
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)) or int(parsed) != parsed:
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(parsed)
    if tp is float:
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(parsed)
    if tp is list or origin is list:
        if isinstance(parsed, str):
            parsed = [p.strip() for p in parsed.split(",") if p.strip()]
        if not isinstance(parsed, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_type, name) for v in parsed]
    if tp is dict or origin is dict:
        if not isinstance(parsed, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return parsed
    return parsed


def parse_overrides(argv: list) -> dict:
    """`["--key", "value", "--flag", "--k2=v"]` -> {"key": "value", "flag": "true", "k2": "v"} (strings)."""
    out, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"unexpected argument {token!r}: options are --key value pairs (e.g. --config FILE.yaml)")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag
            i += 1
        out[key.replace("-", "_")] = value
    return out


def config_from_dict(cls, values: dict, source: str = "config"):
    """Build `cls` (a config dataclass) from raw values, converting each to its field's type. An unknown
    key is an error that suggests the nearest field name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{source}: unknown {cls.__name__} field {key!r}{hint}")
        kwargs[key] = coerce(value, hints[key], key)
    return cls(**kwargs)


def load_yaml(path: str) -> dict:
    """The flat mapping in the YAML file `path`; every error names the file (and the line, for bad YAML)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text (byte offset {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"--config {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value, got a YAML {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"--config {path}: key {bad[0]!r} is not a field name")
    return data
