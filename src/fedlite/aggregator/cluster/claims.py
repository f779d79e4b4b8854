"""A member's claims, batched: every claim asked while one batch is out goes in the next one (one message, one
signature and one answer for many updates), so claiming costs a round trip per batch, not per update."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Waiter:
    client: str
    done: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # "" granted, else why not; None: not answered


class ClaimBatcher:
    """`ask(client)` blocks until the coordinator answers the batch holding it (the reason, "" if granted), or
    raises TimeoutError after `timeout` s. `send(batch, clients)` publishes one batch; `answer` resolves it."""

    def __init__(self, send: Callable[[int, list[str]], None], timeout: float) -> None:
        self._send, self._timeout = send, timeout
        self._lock = threading.Lock()
        self._pending: list[_Waiter] = []
        self._out: tuple[int, float, list[_Waiter]] | None = None  # the batch in flight: number, sent at, waiters
        self._next = 1

    def ask(self, client: str) -> str:
        waiter = _Waiter(client)
        with self._lock:
            self._pending.append(waiter)
            batch = self._take_batch()
        if batch is not None:
            self._send(*batch)
        if not waiter.done.wait(self._timeout) or waiter.reason is None:
            raise TimeoutError(f"no answer to the claim for {client} within {self._timeout:g} s")
        return waiter.reason

    def answer(self, batch: int, refused: dict[str, str]) -> None:
        """The coordinator's answer to `batch`: every client in it not in `refused` is granted."""
        with self._lock:
            if self._out is None or self._out[0] != batch:
                return
            waiters, self._out = self._out[2], None
            following = self._take_batch()
        for waiter in waiters:
            waiter.reason = refused.get(waiter.client, "")
            waiter.done.set()
        if following is not None:
            self._send(*following)

    def _take_batch(self) -> tuple[int, list[str]] | None:
        """Lock held: the pending claims as the next batch if none is out (or the one out has timed out)."""
        if self._out is not None and time.monotonic() - self._out[1] < self._timeout:
            return None
        if not self._pending:
            return None
        number, self._next = self._next, self._next + 1
        self._out = (number, time.monotonic(), self._pending)
        self._pending = []
        return number, [w.client for w in self._out[2]]
