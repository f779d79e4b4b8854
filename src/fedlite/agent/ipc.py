"""Messages between the agent and its job's child process: pickled tuples, length-prefixed, over a pair of pipes."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import struct
from typing import Any

_LENGTH = struct.Struct(">Q")


class PipeClosed(EOFError):
    """The other process closed its end (it exited)."""


class Pipe:
    """One end of the pair: `send` on one pipe, `receive` from the other. Both processes are this package's own,
    so pickle is safe here (nothing from the network is unpickled: payloads travel as bytes inside the tuples)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_LENGTH.pack(len(data)) + data)
        try:
            while view:
                view = view[os.write(self.write_fd, view):]
        except (BrokenPipeError, OSError) as exc:
            raise PipeClosed(str(exc)) from None

    def ready(self, timeout: float) -> bool:
        """Whether a message (or the end) can be read within `timeout` seconds."""
        return bool(select.select([self.read_fd], [], [], max(0.0, timeout))[0])

    def receive(self) -> Any:
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
        return pickle.loads(self._read(length))

    def _read(self, size: int) -> bytes:
        parts, left = [], size
        while left:
            chunk = os.read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise PipeClosed("the other process closed the pipe")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
