"""Who coordinates: the holder of an exclusive lock on `state_dir/coordinator.lock` (POSIX `flock`).

The kernel releases the lock when its holder dies, however it dies, so a waiting member takes over at once and
resumes from the last checkpoint in the same state directory (the members share it: one host, or storage whose
locks are honoured across hosts).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class CoordinatorLease:
    """The coordinator lock of one state directory; `try_take` never blocks."""

    def __init__(self, state_dir: str | Path, member: str) -> None:
        self.path = Path(state_dir) / "coordinator.lock"
        self.member = member
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_take(self) -> bool:
        """Take the lock if it is free (True), or say it is held by another process (False)."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.member} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who wrote the lock file last (the coordinator, while it holds it)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
