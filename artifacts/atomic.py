"""Atomic file writes: a file is either absent, or whole and durable.

Every writer goes through `atomic_write_bytes`: the bytes are written to a temporary file
`.tmp-<random>-<name>` in the destination folder, flushed and fsync-ed, renamed over the
destination with `os.replace` (atomic on POSIX), and the folder is fsync-ed so the rename itself
survives a power cut. A process killed at any point (also by SIGKILL) leaves either the old file or
the new one, never a prefix; it may leave a `.tmp-*` file, which `remove_temporaries` deletes (call it
only while holding the artifact's lock, so that no live writer's temporary is removed).

Each writer returns the sha256 (hex) of the bytes it wrote, so callers can record a checksum
without reading the file back. Arrays are stored with `allow_pickle=False` (object arrays refused).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import tempfile
from typing import Any, Mapping

import numpy as np

__all__ = ["TMP_PREFIX", "atomic_write_bytes", "atomic_write_text", "atomic_write_npy", "atomic_write_npz",
           "npy_bytes", "npz_bytes", "remove_temporaries"]

TMP_PREFIX = ".tmp-"


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / fsync-ed
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str, data: bytes, *, make_dirs: bool = True) -> str:
    """Writes `data` to `path` atomically (temporary file in the same folder, fsync, `os.replace`,
    fsync of the folder); creates missing parent folders when `make_dirs`. Returns sha256(data)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str, text: str, **kwargs: Any) -> str:
    """UTF-8 text through `atomic_write_bytes`; returns its sha256."""
    return atomic_write_bytes(path, text.encode("utf-8"), **kwargs)


def npy_bytes(array: Any) -> bytes:
    """The exact bytes `np.save(..., allow_pickle=False)` writes (deterministic: header + row-major data)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise ValueError(f"refusing to store an object array (dtype {array.dtype}); it would need pickle")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(arrays: Mapping[str, Any], *, compressed: bool = False) -> bytes:
    """The bytes of `np.savez` (or `np.savez_compressed`) of `arrays`; object arrays refused."""
    clean = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.hasobject:
            raise ValueError(f"refusing to store array {name!r} of dtype {value.dtype}; it would need pickle")
        clean[name] = value
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **clean)
    return buffer.getvalue()


def atomic_write_npy(path: str, array: Any, **kwargs: Any) -> str:
    """`np.save(path, array, allow_pickle=False)` atomically; returns the file's sha256."""
    return atomic_write_bytes(path, npy_bytes(array), **kwargs)


def atomic_write_npz(path: str, arrays: Mapping[str, Any], *, compressed: bool = False, **kwargs: Any) -> str:
    """`np.savez(path, **arrays)` atomically (no pickle); returns the file's sha256."""
    return atomic_write_bytes(path, npz_bytes(arrays, compressed=compressed), **kwargs)


def remove_temporaries(*folders: str) -> list[str]:
    """Deletes the `.tmp-*` files killed writers left in `folders` (only while holding the lock that
    keeps every other writer out). Returns the removed paths."""
    removed = []
    for folder in folders:
        for tmp in glob.glob(os.path.join(glob.escape(folder), TMP_PREFIX + "*")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
                removed.append(tmp)
    return removed
