"""JSON Lines record files: one JSON object per line, every field checked, errors that name the line.

The record kinds the attribution path reads (`experiments/attribute.py`):

    lm training sequence     {"id": ..., "text": "..."}
    lm query                 {"id": ..., "prompt": "...", "completion": "..."}   (loss on the completion)
    classification example   {"id": ..., "text": "...", "label": ...}            (training and queries)

`id` is a string or an integer and unique within a file; text fields are strings (`text` and
`completion` non-empty); `label` is an integer or a string. Blank lines are skipped; other fields are
kept and ignored. Any problem raises `RecordError` (a ValueError) naming the file, the line number and
the field: bad JSON, a line that is not an object, a missing or ill-typed field, a duplicate id, an
empty file. Nothing is read partially: the whole file is checked before any record is returned.
"""
from __future__ import annotations

import json
import os
__all__ = ["RecordError", "KINDS", "read_records", "write_records", "file_digest"]

KINDS = {
    "lm_train": {"id": (str, int), "text": str},
    "lm_query": {"id": (str, int), "prompt": str, "completion": str},
    "classification": {"id": (str, int), "text": str, "label": (int, str)},
}
_NON_EMPTY = ("text", "completion")


class RecordError(ValueError):
    """A record file that cannot be used: `file:line: what is wrong` (line 0: the file as a whole)."""

    def __init__(self, path: str, line: int, message: str):
        self.path, self.line = path, line
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {message}")


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({str: "a string", int: "an integer"}[t] for t in types)


def _check_field(path: str, line: int, record: dict, field: str, types, kind: str) -> None:
    if field not in record:
        raise RecordError(path, line, f"missing field {field!r} (a {kind!r} record needs "
                                      f"{sorted(KINDS[kind])}; this one has {sorted(record)})")
    value = record[field]
    allowed = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise RecordError(path, line, f"field {field!r} must be {_type_name(types)}, got "
                                      f"{type(value).__name__} {json.dumps(value)[:60]}")
    if field in _NON_EMPTY and not value.strip():
        raise RecordError(path, line, f"field {field!r} is empty")


def read_records(path: str, kind: str) -> list[dict]:
    """Every record of the JSONL file `path`, checked against `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed values: {sorted(KINDS)}")
    if not os.path.isfile(path):
        raise RecordError(path, 0, "no such file")
    records, first_line = [], {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(path, line_number, f"not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise RecordError(path, line_number, f"a record must be a JSON object, got {type(record).__name__}")
            for field, types in KINDS[kind].items():
                _check_field(path, line_number, record, field, types, kind)
            key = (type(record["id"]).__name__, record["id"])
            if key in first_line:
                raise RecordError(path, line_number, f"duplicate id {record['id']!r} (first on line {first_line[key]})")
            first_line[key] = line_number
            records.append(record)
    if not records:
        raise RecordError(path, 0, f"the file holds no records (expected one JSON object per line with "
                                   f"fields {sorted(KINDS[kind])})")
    return records


def write_records(path: str, records: list[dict]) -> None:
    """Writes records as JSON Lines, atomically (temporary file + rename)."""
    from experiments.common.workdir import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def file_digest(path: str) -> str:
    """sha256 of the file's bytes (what a cached result built from it is keyed by)."""
    from artifacts import file_sha256

    return file_sha256(path)
