"""Strict JSON: NaN and ±Infinity are never written as bare tokens, and never accepted on read.

Python's `json` writes `NaN`, `Infinity` and `-Infinity`, which are not JSON (RFC 8259) and which
other readers reject. `to_jsonable` converts numpy / jax scalars and arrays to plain types and turns
every non-finite float into `null`, recording where it was; the writers then either refuse
(`nonfinite="error"`, a ValueError naming each field) or keep the nulls and add a top-level
`"nonfinite_fields": {"a.b": "nan", "c[2]": "inf"}` flag (`nonfinite="flag"`), so a reader can
tell a missing value from a diverged one. `dumps` always passes `allow_nan=False` as a last guard.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from artifacts.atomic import atomic_write_text

__all__ = ["NONFINITE_KEY", "to_jsonable", "dumps", "loads", "read_json", "atomic_write_json", "CorruptJSONError"]

NONFINITE_KEY = "nonfinite_fields"
NONFINITE_MODES = ("error", "flag")


class CorruptJSONError(ValueError):
    """A JSON file that cannot be parsed (truncated, empty, or holding NaN/Infinity tokens)."""


def _nonfinite_name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_jsonable(value: Any, nonfinite: dict[str, str] | None = None, _where: str = "") -> Any:
    """`value` as plain JSON types: mappings (keys as str), lists, str, int, float, bool, None.

    numpy / jax scalars and arrays become numbers / nested lists. Every NaN or ±inf becomes None; when
    `nonfinite` is a dict, it receives {field path: "nan" | "inf" | "-inf"} for each of them.
    Objects of any other type raise TypeError naming the field.
    """
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, nonfinite, f"{_where}.{k}" if _where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, nonfinite, f"{_where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if nonfinite is not None:
            nonfinite[_where or "<root>"] = _nonfinite_name(value)
        return None
    if isinstance(value, (np.ndarray, np.generic)) or (hasattr(value, "__array__") and hasattr(value, "dtype")):
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return to_jsonable(array.item() if array.ndim == 0 else array.tolist(), nonfinite, _where)
        if array.dtype.kind in "US":
            return array.item() if array.ndim == 0 else array.tolist()
        raise TypeError(f"{_where or 'value'}: cannot store an array of dtype {array.dtype} as JSON")
    raise TypeError(f"{_where or 'value'}: cannot store a {type(value).__name__} as JSON")


def dumps(obj: Any, *, nonfinite: str = "error", indent: int | None = 2, what: str = "JSON") -> str:
    """Strict JSON text of `obj` (keys sorted). nonfinite="error": ValueError naming every NaN/inf
    field; "flag": they are written as null and listed under `obj["nonfinite_fields"]` (obj must
    then be a mapping)."""
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={nonfinite!r}; allowed values: {list(NONFINITE_MODES)}")
    found: dict[str, str] = {}
    plain = to_jsonable(obj, found)
    if found:
        if nonfinite == "error" or not isinstance(plain, dict):
            listed = ", ".join(f"{k}={v}" for k, v in found.items())
            raise ValueError(f"{what} would hold non-finite numbers ({listed}); JSON cannot represent them")
        plain[NONFINITE_KEY] = found
    return json.dumps(plain, indent=indent, sort_keys=True, allow_nan=False)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON token {name}")


def loads(text: str | bytes, *, what: str = "JSON text") -> Any:
    """Parses strict JSON; CorruptJSONError (a ValueError) naming `what` on empty / truncated text or
    NaN / Infinity tokens."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    if not text.strip():
        raise CorruptJSONError(f"{what} is empty")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise CorruptJSONError(f"{what} is not valid JSON: {error}") from None


def read_json(path: str) -> Any:
    """`loads` of the file at `path` (FileNotFoundError if absent; CorruptJSONError naming the path)."""
    with open(path, "rb") as f:
        return loads(f.read(), what=os.path.abspath(path))


def atomic_write_json(path: str, obj: Any, *, nonfinite: str = "error", indent: int | None = 2) -> str:
    """`dumps(obj)` plus a newline, written atomically; returns the file's sha256."""
    return atomic_write_text(path, dumps(obj, nonfinite=nonfinite, indent=indent, what=os.path.abspath(path)) + "\n")
