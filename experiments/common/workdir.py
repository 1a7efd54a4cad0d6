"""The on-disk contract of every experiment: `config.json`, `metrics.jsonl`, `summary.json`.

Files are written atomically (the `artifacts` package: temporary file, fsync, `os.replace`), so a
crashed run never leaves a half-written file behind, and `summary.json` only appears once a run has
finished. JSON is strict: a NaN or infinite number is written as `null` and listed under the
top-level `"nonfinite_fields"` flag (never as a bare `NaN` / `Infinity` token).

`metrics.jsonl` holds one JSON object per line, `{"step": s, "<name>": value, ...}`. A resumed run
never duplicates a record: the training loop drops its own records logged after the checkpoint it
resumes from (`drop_records_after`), an identical record is never written twice, and a line torn by
a kill is dropped.
"""
from __future__ import annotations

import json
import os
from typing import Any

import artifacts
from artifacts import atomic_write_bytes, atomic_write_npz, atomic_write_text, to_jsonable  # noqa: F401  (re-exported)

__all__ = ["to_jsonable", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_npz",
           "Workdir", "METRICS", "NONFINITE_KEY"]

METRICS = "metrics.jsonl"
NONFINITE_KEY = artifacts.NONFINITE_KEY


def atomic_write_json(path: str, obj: Any) -> None:
    """Strict JSON, atomically: non-finite numbers become null, flagged under "nonfinite_fields"."""
    artifacts.atomic_write_json(path, obj, nonfinite="flag")


class Workdir:
    """A run's folder. `log` appends one step-stamped JSON object per line to `metrics.jsonl`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)
        self._logged: set[str] | None = None  # canonical JSON of every record in the file, loaded lazily

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _read_lines(self) -> tuple[list[dict], bool]:
        """(records, whether the file needs rewriting: a torn or unparseable line was found)."""
        file = self.file(METRICS)
        if not os.path.exists(file):
            return [], False
        records, damaged = [], False
        with open(file, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = artifacts.loads(line, what=file)
                except ValueError:
                    damaged = True  # e.g. the last line of a run killed while appending
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
                else:
                    damaged = True
        return records, damaged

    def _rewrite(self, records: list[dict]) -> None:
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records)
        atomic_write_text(self.file(METRICS), text)

    def _load(self) -> None:
        records, damaged = self._read_lines()
        if damaged:
            self._rewrite(records)
        self._logged = {json.dumps(r, sort_keys=True) for r in records}

    def log(self, step: int, **metrics: Any) -> None:
        """Appends {"step": step, **metrics} (strict JSON: NaN/inf as null, flagged), unless an
        identical record is already in the file: a resumed deterministic run that logs a step again
        does not duplicate it."""
        if self._logged is None:
            self._load()
        found: dict[str, str] = {}
        values = artifacts.to_jsonable(metrics, found)
        if found:
            values[NONFINITE_KEY] = found
        record = {"step": int(step), **values}
        text = json.dumps(record, sort_keys=True, allow_nan=False)
        if text in self._logged:
            return
        with open(self.file(METRICS), "a") as f:
            f.write(text + "\n")
            f.flush()
        self._logged.add(text)

    def drop_records_after(self, step: int, prefixes: tuple[str, ...]) -> int:
        """Removes the records logged after `step` whose every metric name starts with one of
        `prefixes` (e.g. a training loop's "train/" and "eval/" records that a run killed after its
        checkpoint at `step` wrote, and that the resumed run logs again). Returns how many."""
        records, damaged = self._read_lines()

        def owned(r: dict) -> bool:
            names = [k for k in r if k not in ("step", NONFINITE_KEY)]
            return r["step"] > step and bool(names) and all(k.startswith(prefixes) for k in names)

        kept = [r for r in records if not owned(r)]
        if len(kept) != len(records) or damaged:
            self._rewrite(kept)
        self._logged = {json.dumps(r, sort_keys=True) for r in kept}
        return len(records) - len(kept)

    def read_metrics(self) -> list[dict]:
        """Every record of metrics.jsonl (a torn line is skipped)."""
        return self._read_lines()[0]
