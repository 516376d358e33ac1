"""The files of a run folder: an exclusive lock, strict JSON lines, and writes whose
failures say what happened (a full disk, a file-size limit, no permission) and where."""

import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import IO, Any

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose an out_dir on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another out_dir",
    errno.EFBIG: "the file is larger than the filesystem or this process's file-size "
    "limit (`ulimit -f`) allows",
    errno.EACCES: "no permission to write there: choose an out_dir you own",
    errno.EPERM: "the operation is not permitted there: choose an out_dir you own",
    errno.EROFS: "the filesystem is read-only: choose an out_dir on a writable disk",
}


def io_error(error: OSError, path: Path, doing: str) -> OSError:
    """``error`` restated with its cause in words, the path, and what to do."""
    code = error.errno if error.errno is not None else 0
    cause = os.strerror(code) if code else str(error)
    hint = _HINTS.get(code, "")
    message = f"could not {doing} {path}: {cause}" + (f" ({hint})" if hint else "")
    return OSError(code, message, str(path))


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to the disk, or raise a clear OSError."""
    try:
        with path.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise io_error(error, path, "write") from error


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _strict(value: Any) -> Any:
    """Non-finite floats become None (JSON null), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def strict_json(record: dict[str, Any]) -> str:
    """One line of strict JSON: NaN and ±inf written as null (readers of strict JSON
    refuse the ``NaN``/``Infinity`` that Python's json writes by default)."""
    return json.dumps(_strict(record), allow_nan=False)


def append_line(handle: IO[str], path: Path, line: str) -> None:
    try:
        handle.write(line + "\n")
        handle.flush()
    except OSError as error:
        raise io_error(error, path, "append to") from error


class RunFolderLockedError(RuntimeError):
    """Another process is running in this ``out_dir``."""


class RunLock:
    """An exclusive OS lock on ``<out_dir>/.lock`` for the life of a run.

    The kernel releases it when the process ends, crash included, so a stale lock
    never blocks a new run. On systems without ``fcntl`` (Windows) it is a no-op.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self.handle: IO[str] | None = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        try:
            handle = self.path.open("a+", encoding="utf-8")
        except OSError as error:
            raise io_error(error, self.path, "create the run lock") from error
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunFolderLockedError(
                f"{self.path.parent} is in use by another kltune run ({holder}); two runs "
                "in one folder would interleave their logs and overwrite each other's "
                "checkpoints. Wait for it to end (or stop it), then resume with "
                "resume=True, or give this run another out_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the descriptor releases the lock
            self.handle = None
