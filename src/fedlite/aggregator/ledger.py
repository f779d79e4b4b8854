"""The run's ledger of refusals: every refused message, by kind and reason, for history, logs and Prometheus."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Protocol

log = logging.getLogger("fedlite.aggregator")

# Message kinds a refusal is filed under (the topic a message came on, or what it claimed to be).
KINDS = ("update", "status", "report", "cluster")
# Reasons that are normal in a healthy run (over-selection makes late updates routine): logged at INFO.
ROUTINE = frozenset({"late"})


class RefusalSink(Protocol):
    def refused(self, kind: str, reason: str) -> None: ...


class Ledger:
    """Counts refusals by (kind, reason) for the whole run and since the last history record; thread-safe.

    Each distinct (round, kind, reason) is logged once, so a flood costs one log line, not one per message.
    """

    def __init__(self, sink: RefusalSink | None = None) -> None:
        self._sink = sink
        self._total: Counter[tuple[str, str]] = Counter()
        self._pending: Counter[tuple[str, str]] = Counter()
        self._logged: set[tuple[int | None, str, str]] = set()
        self._lock = threading.Lock()

    def refuse(self, kind: str, reason: str, round_number: int | None, detail: str) -> None:
        """Count one refused message; `round_number` None means it arrived between rounds."""
        key = (kind, reason)
        with self._lock:
            self._total[key] += 1
            self._pending[key] += 1
            first = (round_number, kind, reason) not in self._logged
            if first:
                self._logged.add((round_number, kind, reason))
                if len(self._logged) > 10_000:  # bounded: forget old rounds' log suppression
                    self._logged = {(round_number, kind, reason)}
        if self._sink is not None:
            self._sink.refused(kind, reason)
        if first:
            where = "between rounds" if round_number is None else f"round {round_number}"
            log.log(logging.INFO if reason in ROUTINE else logging.WARNING,
                    "%s: %s refused (%s): %s (further ones are counted, not logged)", where, kind, reason, detail)

    def take(self) -> dict[str, dict[str, int]]:
        """The refusals since the previous call, as {kind: {reason: count}}, for the next history record."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        return _nested(pending)

    def totals(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return _nested(self._total)

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(n for (k, _), n in self._total.items() if kind is None or k == kind)


def _nested(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (kind, reason), n in sorted(counts.items()):
        out.setdefault(kind, {})[reason] = n
    return out


def run_totals(history: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """The per-run ledger summed over history records' ``refusals`` (what the dashboard and report show)."""
    total: Counter[tuple[str, str]] = Counter()
    for record in history:
        for kind, reasons in (record.get("refusals") or {}).items():
            for reason, n in reasons.items():
                total[(kind, reason)] += int(n)
    return _nested(total)
