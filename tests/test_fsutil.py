"""The one atomic write: a failure keeps the old file, leaves no temporary, raises StorageError (path, cause)."""

from __future__ import annotations

import errno
import resource

import pytest

from fedlite.fsutil import StorageError, append_durably, ensure_dir, fsync_dir, write_atomic


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_raises_storage_error(tmp_path):
    """A disk-full-like failure that also hits root: RLIMIT_FSIZE makes write() fail with EFBIG."""
    target = tmp_path / "history.json"
    write_atomic(target, b"[1, 2, 3]")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # CPython ignores SIGXFSZ
    try:
        with pytest.raises(StorageError) as info:
            write_atomic(target, b"x" * 200_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(info.value) == f"cannot write {target}: File too large"
    assert info.value.path == target and info.value.cause.errno == errno.EFBIG
    assert isinstance(info.value, OSError)  # callers that catch OSError keep working
    assert target.read_bytes() == b"[1, 2, 3]" and [p.name for p in tmp_path.iterdir()] == ["history.json"]


def test_every_helper_raises_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=r"cannot write .*a-file/x: Not a directory"):
        write_atomic(blocker / "x", b"")
    with pytest.raises(StorageError, match=r"cannot create directory .*a-file/d"):
        ensure_dir(blocker / "d")
    with pytest.raises(StorageError, match=r"cannot sync directory .*missing: No such file or directory"):
        fsync_dir(tmp_path / "missing")
    with pytest.raises(StorageError, match=r"cannot append to .*a-file/log"):
        append_durably(blocker / "log", b"line\n")
