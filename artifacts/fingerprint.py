"""Fingerprints: every saved artifact records what made it, and every reuse checks it.

A fingerprint is a JSON-able mapping of everything that determines an artifact's content (the config
fields that matter, the parameter hash `tree_digest(params)`, a data digest, code-relevant options)
plus its `digest`, sha256 of the canonical JSON (sorted keys, no spaces). It is stored beside the
artifact (`<folder>/fingerprint.json`, or inside the artifact's own manifest), and before an artifact
is reused `check_fingerprint` / `check_fields` compares the stored fields with the requested ones: any
difference raises `FingerprintMismatchError` (a ValueError) naming each differing field with both
values, so stale state is never silently reused. Callers that prefer a fresh folder per setting use
`subfolder_for(folder, fields)`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

from artifacts.jsonio import atomic_write_json, read_json, to_jsonable

__all__ = ["FINGERPRINT_FILE", "ABSENT", "FingerprintMismatchError", "normalise", "digest", "diff_fields",
           "write_fingerprint", "read_fingerprint", "check_fingerprint", "check_fields", "tree_digest",
           "array_digest", "subfolder_for"]

FINGERPRINT_FILE = "fingerprint.json"
FORMAT = "gradsketch.fingerprint"
ABSENT = "<absent>"


class FingerprintMismatchError(ValueError):
    """An artifact on disk was made with other settings. `.path`; `.fields` maps each differing field
    (dotted path) to (on disk, requested)."""

    def __init__(self, path: str, fields: Mapping[str, tuple[Any, Any]], what: str = "artifact", hint: str = ""):
        self.path = path
        self.fields = dict(fields)
        lines = [f"  {name}: {_short(old)} (on disk) vs {_short(new)} (requested)"
                 for name, (old, new) in list(self.fields.items())[:20]]
        if len(self.fields) > 20:
            lines.append(f"  ... and {len(self.fields) - 20} more")
        names = list(self.fields)
        listed = ", ".join(names[:10]) + (f", ... ({len(names)} fields)" if len(names) > 10 else "")
        super().__init__(
            f"the {what} at {path} was made with different settings ({listed}); refusing to "
            f"reuse it ({hint or 'use another folder, or delete it to recompute'}):\n" + "\n".join(lines))


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + " ...]"


def normalise(fields: Mapping[str, Any]) -> dict:
    """`fields` exactly as they read back from JSON (tuples as lists, numpy scalars as numbers).
    Non-finite floats are refused (ValueError), since they would not compare equal."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"fingerprint fields must be a mapping, got {type(fields).__name__}")
    found: dict[str, str] = {}
    try:
        plain = to_jsonable(fields, found)
    except TypeError as error:
        raise ValueError(f"fingerprint fields must be JSON data: {error}") from None
    if found:
        raise ValueError(f"fingerprint fields hold non-finite numbers: {found}")
    return json.loads(json.dumps(plain, sort_keys=True, allow_nan=False))


def digest(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `normalise(fields)`."""
    text = json.dumps(normalise(fields), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def diff_fields(old: Any, new: Any, _where: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted field: (old, new)} for every leaf that differs; nested mappings are compared field by
    field (and lists of equal length item by item, "a[3]"), a field present on one side only shows
    "<absent>" on the other."""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = {}
        for i, (a, b) in enumerate(zip(old, new)):
            out.update(diff_fields(a, b, f"{_where}[{i}]"))
        return out
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(old) | set(new), key=str):
            name = f"{_where}.{key}" if _where else str(key)
            out.update(diff_fields(old.get(key, ABSENT), new.get(key, ABSENT), name))
        return out
    return {} if old == new else {_where or "<root>": (old, new)}


def _file(folder_or_file: str, name: str) -> str:
    return folder_or_file if folder_or_file.endswith(".json") else os.path.join(folder_or_file, name)


def write_fingerprint(folder_or_file: str, fields: Mapping[str, Any], *, name: str = FINGERPRINT_FILE) -> str:
    """Stores {"format", "digest", "fields"} atomically at `folder/name` (or at a path ending in
    .json); returns the digest."""
    plain = normalise(fields)
    value = digest(plain)
    atomic_write_json(_file(folder_or_file, name), {"format": FORMAT, "version": 1, "digest": value, "fields": plain})
    return value


def read_fingerprint(folder_or_file: str, *, name: str = FINGERPRINT_FILE) -> dict | None:
    """The stored fields, or None when no fingerprint file exists (a corrupt one raises ValueError)."""
    file = _file(folder_or_file, name)
    if not os.path.exists(file):
        return None
    stored = read_json(file)
    if not isinstance(stored, dict) or stored.get("format") != FORMAT or not isinstance(stored.get("fields"), dict):
        raise ValueError(f"{file} is not a fingerprint file (format {FORMAT!r})")
    if stored.get("digest") != digest(stored["fields"]):
        raise ValueError(f"{file} is corrupt: its digest does not match its fields")
    return stored["fields"]


def check_fields(path: str, stored: Mapping[str, Any] | None, fields: Mapping[str, Any], *,
                 what: str = "artifact", hint: str = "") -> None:
    """FingerprintMismatchError unless `stored` (fields read from an artifact's own manifest) equals
    `fields` after normalisation; `stored=None` means the artifact records no fingerprint, which is a
    mismatch too (it cannot be trusted)."""
    new = normalise(fields)
    old = {} if stored is None else normalise(stored)
    if stored is None:
        raise FingerprintMismatchError(path, {k: (ABSENT, v) for k, v in new.items()} or {"<root>": (None, new)},
                                       what, hint)
    differing = diff_fields(old, new)
    if differing:
        raise FingerprintMismatchError(path, differing, what, hint)


def check_fingerprint(folder_or_file: str, fields: Mapping[str, Any], *, what: str = "artifact",
                      name: str = FINGERPRINT_FILE, write: bool = True, hint: str = "") -> bool:
    """Compares `fields` with the fingerprint stored at `folder/name`. Returns True when it exists
    and matches; when there is none, writes it (if `write`) and returns False; raises
    FingerprintMismatchError naming the differing fields otherwise."""
    stored = read_fingerprint(folder_or_file, name=name)
    if stored is None:
        if write:
            write_fingerprint(folder_or_file, fields, name=name)
        return False
    check_fields(os.path.abspath(folder_or_file), stored, fields, what=what, hint=hint)
    return True


def tree_digest(tree: Any) -> str:
    """sha256 (hex) over every array leaf's path (`jax.tree_util.keystr`), dtype, shape and row-major
    bytes, in `jax.tree_util` order: the parameter hash / data digest. Equal trees give equal digests
    in any process; any change of a value, dtype, shape or leaf name changes it."""
    import jax

    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError("tree_digest: the tree has no array leaves")
    for path, leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        header = f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(array.tobytes())
    return h.hexdigest()


def array_digest(*arrays: Any) -> str:
    """sha256 (hex) over the dtype, shape and row-major bytes of each array, in order (no jax needed)."""
    h = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        if array.dtype.hasobject:
            raise ValueError(f"array_digest: object arrays have no stable bytes (dtype {array.dtype})")
        header = f"{array.dtype.str}|{array.shape}\n".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(array.tobytes())
    return h.hexdigest()


def subfolder_for(folder: str, fields: Mapping[str, Any], *, prefix: str = "fp-") -> str:
    """`folder/fp-<first 12 hex of digest(fields)>`: one fresh subfolder per distinct setting."""
    return os.path.join(folder, prefix + digest(fields)[:12])
