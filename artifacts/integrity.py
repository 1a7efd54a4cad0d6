"""Checksums verified on read, and paths from manifests confined to their folder.

`file_sha256` streams a file through sha256 (hardware-accelerated on CPUs with SHA extensions, so
verifying is bounded by reading the bytes). `verify_file` compares a file with the checksum recorded
when it was written and raises `CorruptArtifactError` naming the file, with "empty (0 bytes)" for a
truncated-to-nothing file. `confined_path` resolves a relative path read from a manifest and refuses
absolute paths and anything that resolves (through `..` or symlinks) outside the folder.
"""
from __future__ import annotations

import hashlib
import os

__all__ = ["CorruptArtifactError", "UnsafePathError", "file_sha256", "verify_file", "confined_path"]

CHUNK = 1 << 22


class CorruptArtifactError(ValueError):
    """A file whose bytes do not match the checksum recorded for it (or that is empty / unreadable).
    `.path` is the file."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


class UnsafePathError(ValueError):
    """A path read from a manifest that would leave its folder."""


def file_sha256(path: str) -> str:
    """sha256 (hex) of the file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def verify_file(path: str, expected_sha256: str, *, what: str = "file", recorded_in: str = "its manifest") -> None:
    """CorruptArtifactError naming `path` when the file is missing, empty or its sha256 differs from
    `expected_sha256`."""
    if not os.path.exists(path):
        raise CorruptArtifactError(path, f"{what} {path} is missing (listed in {recorded_in})")
    if os.path.getsize(path) == 0:
        raise CorruptArtifactError(path, f"{what} {path} is empty (0 bytes); its checksum is in {recorded_in}")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise CorruptArtifactError(path, f"{what} {path} is corrupt: sha256 {actual} differs from "
                                         f"{expected_sha256} recorded in {recorded_in}")


def confined_path(folder: str, relative: str, *, what: str = "path") -> str:
    """The absolute path of `relative` inside `folder`; UnsafePathError for an absolute path, an empty
    one, or one that resolves (after `..` and symlinks) outside `folder`."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative) or "\x00" in relative:
        raise UnsafePathError(f"{what} {relative!r} must be a non-empty relative path inside {folder}")
    root = os.path.realpath(folder)
    resolved = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        raise UnsafePathError(f"{what} {relative!r} leaves its folder {folder} (resolves to {resolved}); refusing it")
    return resolved
