"""The on-disk contract of every experiment: `config.json`, `metrics.jsonl`, `summary.json`.

Files are written atomically (temporary file, then `os.replace`), so a crashed run never leaves a
half-written file behind, and `summary.json` only appears once a run has finished.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from typing import Any, Mapping

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Converts numpy / jax scalars and arrays (and nested containers) into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray,)) or hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_npz(path: str, arrays: Mapping[str, Any]) -> None:
    """np.savez of `arrays` (name -> array), written atomically (never a half-written store)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


class Workdir:
    """A run's folder. `log` appends one step-stamped JSON object per line to `metrics.jsonl`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(self.path, exist_ok=True)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def log(self, step: int, **metrics: Any) -> None:
        record = {"step": int(step), **to_jsonable(metrics)}
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not os.path.exists(self.file("metrics.jsonl")):
            return []
        with open(self.file("metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
