"""An exclusive, non-blocking lock on an artifact folder (`flock`; the kernel drops it when the
holder dies, also under SIGKILL, so a killed run never leaves a stale lock behind)."""
from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

__all__ = ["LockedError", "exclusive_lock"]


class LockedError(RuntimeError):
    """Another live process holds the lock. `.path` is the lock file, `.holder` its pid text."""

    def __init__(self, path: str, holder: str, message: str):
        self.path, self.holder = path, holder
        super().__init__(message)


@contextlib.contextmanager
def exclusive_lock(lock_file: str, *, what: str = "using this folder"):
    """Holds an exclusive `flock` on `lock_file` (created if needed; the holder's pid is written into
    it) for the `with` block. Raises LockedError at once, naming the holder's pid, when another process
    holds it: "another process is {what} ...". Re-entrance from the same process is refused too (flock
    locks belong to open files)."""
    folder = os.path.dirname(os.path.abspath(lock_file))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(OSError):
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                holder = locals().get("holder") or "unknown"
                raise LockedError(lock_file, holder,
                                  f"another process is {what} (pid {holder} holds the lock {lock_file}); wait for "
                                  "it to finish or end it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_file
    finally:
        os.close(fd)
