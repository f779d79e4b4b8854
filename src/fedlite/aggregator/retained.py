"""The retained topics an aggregator owns: signed broadcasts, remembered and re-asserted when the broker loses them."""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any

log = logging.getLogger("fedlite.aggregator")


class RetainedTopics:
    """Signs and publishes retained broadcasts, and puts back what a broker lost or someone overwrote.

    `observe` (network thread) compares what the broker holds with what was sent; `reconnected` (network
    thread) notes a new connection, after which the broker may have lost everything (a SIGKILL before its
    database was saved). `repair` (main thread) re-publishes every broadcast when either happened.
    """

    def __init__(self, signer: Any | None, metrics: Any) -> None:
        self._signer = signer
        self._metrics = metrics
        self._link: Any = None
        self._held: dict[str, bytes] = {}  # topic -> the signed payload the broker should hold
        self._sent: dict[str, list[bytes]] = {}  # sha256 of the last few payloads sent per topic: their echoes
        self._lock = threading.Lock()
        self._needed = threading.Event()
        self.repairs = 0

    def attach(self, link: Any) -> None:
        self._link = link

    def broadcast(self, topic: str, payload: bytes) -> None:
        """Publish retained, signed when a key is configured; remembered, so it can be re-asserted."""
        signed = self._signer.sign(topic, payload) if self._signer else payload
        with self._lock:
            self._held[topic] = signed
            self._sent[topic] = [*self._sent.get(topic, [])[-3:], hashlib.sha256(signed).digest()]
        self._link.publish(topic, signed, retain=True)

    def send(self, topic: str, payload: bytes) -> int:
        """Publish signed (when a key is configured), not retained: a message for one device (secure rounds).
        Returns the bytes sent."""
        signed = self._signer.sign(topic, payload) if self._signer else payload
        self._link.publish_nowait(topic, signed)
        return len(signed)

    def clear(self, topic: str) -> None:
        """Drop a retained topic (an empty payload), e.g. a closed round's weights."""
        with self._lock:
            self._held.pop(topic, None)
        self._link.publish(topic, b"", retain=True)

    def reconnected(self) -> None:
        self._needed.set()

    def observe(self, topic: str, payload: bytes) -> None:
        """What the broker holds on one of these topics (network thread): schedule a repair if it differs."""
        with self._lock:
            ours = self._held.get(topic)
            echo = hashlib.sha256(payload).digest() in self._sent.get(topic, [])
        if ours is not None and payload != ours and not echo:
            log.warning("the broker holds %s B on %s that this aggregator did not send: re-publishing its own",
                        len(payload), topic)
            self._needed.set()

    def repair(self) -> None:
        """Re-publish every retained broadcast after a reconnect or an overwrite (main thread); else nothing."""
        if not self._needed.is_set():
            return
        self._needed.clear()
        with self._lock:
            held = dict(self._held)
        for topic, payload in held.items():
            try:
                self._link.publish(topic, payload, retain=True, timeout=10)
            except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
                log.warning("could not re-assert %s: %s; will retry", topic, exc)
                self._needed.set()
                return
        self.repairs += 1
        self._metrics.retained_repaired()
        log.info("re-asserted %d retained topics on the broker", len(held))
