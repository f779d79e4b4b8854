"""Durable local storage: one atomic file write, directory fsync, and StorageError for every failure."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class StorageError(OSError):
    """A write to local storage failed (disk full, read-only, permissions, I/O); the message names path and cause.

    It is an OSError so that code catching OSError keeps working; the original error is its ``__cause__``
    and ``cause``.
    """

    def __init__(self, message: str, path: str | Path | None = None, cause: OSError | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.cause = cause

    def __str__(self) -> str:
        return str(self.args[0])


def describe(exc: OSError) -> str:
    """An OSError's cause in words, e.g. "No space left on device"."""
    return exc.strerror or str(exc) or type(exc).__name__


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader or a power cut sees the old file or the new one, never a mix.

    A temporary file in the same directory is written, fsync'd and renamed over `path`; then the directory is
    fsync'd so that the rename itself is on disk. Any failure removes the temporary file and raises StorageError.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise StorageError(f"cannot write {path}: {describe(exc)}", path, exc) from exc
    fsync_dir(path.parent)


def write_npz(path: str | Path, arrays: Mapping[str, Any]) -> None:
    """`arrays` as one .npz file, replaced atomically (`write_atomic`: StorageError on failure)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def write_private(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with a file only its owner can read (0600 from its creation, never wider for a moment)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that the entries created, renamed or removed in it survive a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot sync directory {path}: {describe(exc)}", path, exc) from exc


def append_durably(path: str | Path, data: bytes) -> None:
    """Append `data` to `path` (created if missing) and fsync it."""
    try:
        with open(path, "ab") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise StorageError(f"cannot append to {path}: {describe(exc)}", path, exc) from exc


def ensure_dir(path: str | Path) -> Path:
    """Create `path` and its parents if missing; StorageError if that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create directory {path}: {describe(exc)}", path, exc) from exc
    return path


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only or vanished directory: nothing more can be done
        path.unlink(missing_ok=True)
