"""The aggregator's inbox: the MQTT network thread only enqueues; worker threads decode and validate off it."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("fedlite.aggregator")


@dataclass(frozen=True)
class Item:
    kind: str  # "update" | "report" | "secagg" | "partial" (another aggregator's partial sum)
    client: str  # from the topic: the broker-authenticated sender (a device, or an aggregator member)
    payload: bytes


class Inbox:
    """A queue bounded in items and bytes in front of `workers` threads that call `handle(item)`.

    `put` never blocks the network thread: when the inbox is full the message is refused by calling
    `on_busy(item)` (counted as ``busy``), so a flood cannot delay PUBACKs, keepalives or other devices.
    """

    def __init__(self, handle: Callable[[Item], None], on_busy: Callable[[Item], None], *, workers: int = 2,
                 max_items: int = 4096, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._handle = handle
        self._on_busy = on_busy
        self._queue: queue.Queue[Item | None] = queue.Queue()
        self._max_items, self._max_bytes = max_items, max_bytes
        self._items = self._bytes = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy_workers = 0
        self._threads = [threading.Thread(target=self._work, name=f"inbox-{i}", daemon=True) for i in range(workers)]

    def start(self) -> Inbox:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(10)

    def put(self, item: Item) -> bool:
        """Enqueue (network thread); False, after refusing it as busy, when the inbox is full."""
        with self._lock:
            full = self._items >= self._max_items or self._bytes + len(item.payload) > self._max_bytes
            if not full:
                self._items += 1
                self._bytes += len(item.payload)
        if full:
            self._on_busy(item)
            return False
        self._queue.put(item)
        return True

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far has been handled."""
        if not any(thread.is_alive() for thread in self._threads):  # not started (tests): handle it here
            while self._items:
                item = self._queue.get_nowait()
                if item is not None:
                    self._run(item)
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._items == 0 and self._busy_workers == 0, timeout)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            with self._lock:
                self._busy_workers += 1
            self._run(item)
            with self._idle:
                self._busy_workers -= 1
                self._idle.notify_all()

    def _run(self, item: Item) -> None:
        try:
            self._handle(item)
        except Exception:  # a handler bug must not kill a worker: the message is lost, the inbox goes on
            log.exception("error while handling a %s from %s", item.kind, item.client)
        finally:
            with self._lock:
                self._items -= 1
                self._bytes -= len(item.payload)
