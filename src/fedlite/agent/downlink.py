"""A round's global weights on the device: the ones it holds, brought up to date by deltas, or the full copy.

The device keeps the last weights it trained from (`HeldWeights`, in its state dir, written atomically). When
an announcement's digest names them, nothing is downloaded; when it holds round v's weights of the same run and
model and the retained deltas reach back to v (``delta_base <= v``), it applies the deltas of rounds v + 1 ..
round and checks the digest; otherwise, or when any of that fails, it downloads the full weights.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.fsutil import StorageError, write_npz
from fedlite.protocol import topics
from fedlite.protocol.codec import decode
from fedlite.protocol.downlink import apply_delta, digest
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten
from fedlite.protocol.messages import RoundAnnouncement

log = logging.getLogger("fedlite.agent")
FILE = "weights.npz"
DELTA_WAIT_SECONDS = 10.0  # retained deltas arrive at once; one that does not is not waited for longer
# (topics, seconds to wait at most) -> each topic's verified payload, or None if it did not arrive in time
Receive = Callable[[list[str], float], list[bytes | None]]


class WeightsRefused(Exception):
    """The round's weights could not be had (the full copy did not arrive, or was not valid)."""


@dataclass(frozen=True)
class Held:
    """Global weights the device holds: which run, model and round they belong to."""

    run: str
    model_hash: str
    round: int
    flat: np.ndarray

    @property
    def digest(self) -> str:
        return digest(self.flat)


class HeldWeights:
    """The last global weights this device received, kept across restarts (one model's, the latest round's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._held: Held | None = None
        self._loaded = False

    def get(self, run: str, model_hash: str) -> Held | None:
        held = self._read()
        return held if held is not None and (held.run, held.model_hash) == (run, model_hash) else None

    def keep(self, held: Held) -> None:
        self._held, self._loaded = held, True
        meta = {"run": held.run, "model_hash": held.model_hash, "round": held.round}
        try:
            write_npz(self.path, {"meta": np.array(json.dumps(meta)), "flat": held.flat})
        except StorageError as exc:  # the next round downloads the full weights; training goes on
            log.warning("held weights not saved: %s", exc)

    def status(self) -> tuple[str, int]:
        """(run, round) of the weights held, for the device's status ("", 0: none)."""
        held = self._read()
        return (held.run, held.round) if held else ("", 0)

    def _read(self) -> Held | None:
        if self._loaded:
            return self._held
        self._loaded = True
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta: dict[str, Any] = json.loads(str(data["meta"]))
                self._held = Held(str(meta["run"]), str(meta["model_hash"]), int(meta["round"]),
                                  data["flat"].astype(np.float32))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("held weights %s are unreadable (%s): the next round downloads the full weights",
                        self.path, exc)
            self.path.unlink(missing_ok=True)
        return self._held


@dataclass
class Fetched:
    """A round's weights and how they came: "held", "delta" or "full", with the payload bytes received."""

    flat: np.ndarray
    how: str
    bytes: int


def fetch(a: RoundAnnouncement, manifest: dict[str, Any], held: HeldWeights, receive: Receive,
          on_bad: Callable[[str], None]) -> Fetched:
    """The weights to train round `a` from (kept as held); raises WeightsRefused. `on_bad` counts a bad frame."""
    mine = held.get(a.run, a.model_hash)
    if mine is not None and a.weights_digest and mine.digest == a.weights_digest:
        if mine.round != a.round:
            held.keep(Held(a.run, a.model_hash, a.round, mine.flat))
        return Fetched(mine.flat, "held", 0)
    fetched, spent = None, 0
    if mine is not None and 0 < a.delta_base <= mine.round < a.round:
        fetched, spent = _by_deltas(a, manifest, mine, receive, on_bad)
    if fetched is None:
        fetched = _full(a, manifest, receive, on_bad)
        fetched.bytes += spent  # deltas that arrived but did not do
    held.keep(Held(a.run, a.model_hash, a.round, fetched.flat))
    return fetched


def _by_deltas(a: RoundAnnouncement, manifest: dict[str, Any], mine: Held, receive: Receive,
               on_bad: Callable[[str], None]) -> tuple[Fetched | None, int]:
    """(Round `a`'s weights as `mine` plus the deltas since, or None after a log line; the bytes received)."""
    rounds = list(range(mine.round + 1, a.round + 1))
    flat, received = mine.flat, 0
    try:
        payloads = receive([topics.delta_topic(a.federation, r) for r in rounds], DELTA_WAIT_SECONDS)
        received = sum(len(p) for p in payloads if p)
        for number, payload in zip(rounds, payloads, strict=True):
            if payload is None:
                raise ProtocolError("missing", f"the delta to round {number} did not arrive")
            flat = apply_delta(flat, payload, manifest, round_number=number, run=a.run, model_hash=a.model_hash)
        if a.weights_digest and digest(flat) != a.weights_digest:
            raise ProtocolError("digest", "the deltas did not give the announced weights")
    except ProtocolError as exc:
        on_bad(exc.reason)
        log.warning("round %d: downloading the full weights: %s", a.round, exc)
        return None, received
    return Fetched(flat, "delta", received), received


def _full(a: RoundAnnouncement, manifest: dict[str, Any], receive: Receive, on_bad: Callable[[str], None]) -> Fetched:
    try:
        (payload,) = receive([a.weights_topic], float("inf"))
        if payload is None:
            raise WeightsRefused("global weights did not arrive before the round closed")
        message = decode(payload)
        if message.header.kind != "weights" or message.header.round != a.round:
            raise ProtocolError("stale", f"weights for round {message.header.round}, expected {a.round}")
        if message.header.run != a.run:
            raise ProtocolError("run", "weights belong to another run")
        if message.header.model_hash != a.model_hash:
            raise ProtocolError("model_hash", "weights belong to another model")
        return Fetched(flatten(message.tensors, manifest), "full", len(payload))
    except ProtocolError as exc:
        on_bad(exc.reason)
        raise WeightsRefused(f"weights message refused: {exc}") from None
