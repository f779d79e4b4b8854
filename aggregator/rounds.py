"""The round state machine: selection, collection of updates and reports, and the closing rule."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlite.aggregator.kpis import Sketcher, cosine_to_aggregate
from fedlite.aggregator.validation import Rejected, RoundContext, ValidUpdate, validate_update
from fedlite.protocol.codec import Limits
from fedlite.protocol.messages import DeviceReport


def select(eligible: list[str], clients_per_round: int, over_selection: float, rng: np.random.Generator) -> list[str]:
    """K * (1 + over-selection) devices drawn without replacement (all of them when fewer are eligible)."""
    want = min(len(eligible), math.ceil(clients_per_round * (1 + over_selection)))
    picked = rng.choice(len(eligible), size=want, replace=False) if want else []
    return sorted(eligible[i] for i in picked)


@dataclass
class RoundOutcome:
    """What a closed round attempt yields: the aggregate (if complete) and its record for the history."""

    complete: bool
    aggregate: dict[str, np.ndarray] | None
    record: dict[str, Any]
    cosines: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundAttempt:
    """One attempt at one round. Thread-safe: updates arrive on the network thread."""

    number: int
    session: str
    selected: list[str]
    deadline: float
    clients_per_round: int
    quorum: int
    context: RoundContext
    aggregator: Any  # strategies.Aggregator: add(delta, weight), count, result()
    limits: Limits
    started_at: float = field(default_factory=time.time)
    declined: dict[str, str] = field(default_factory=dict)
    aborted: dict[str, str] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    bytes_up: int = 0
    clipped: int = 0
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    closed: bool = False
    sketcher: Sketcher | None = None
    sketches: dict[str, np.ndarray] = field(default_factory=dict)
    example_counts: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def accepted(self) -> set[str]:
        return self.context.accepted

    def offer(self, payload: bytes, topic_client: str) -> ValidUpdate:
        """Validate and fold in one update; raises Rejected (already counted) if it is refused."""
        with self._lock:
            self.bytes_up += len(payload)
            try:
                if self.closed:
                    raise Rejected("late", f"round {self.number} is already closed")
                update = validate_update(payload, topic_client, self.context, self.limits)
            except Rejected as exc:
                self.rejected[exc.reason] += 1
                raise
            self.aggregator.add(update.delta, float(update.num_examples))  # validation recorded it as accepted
            self.clipped += int(update.clipped)
            self.client_metrics[update.client_id] = dict(update.metrics)
            self.norms[update.client_id] = update.norm
            self.example_counts[update.client_id] = float(update.num_examples)
            if self.sketcher is not None:
                self.sketches[update.client_id] = self.sketcher.sketch(update.delta)
            return update

    def report(self, report: DeviceReport) -> bool:
        """Record a decline or abort from a selected device; False if the report does not belong here."""
        if report.round != self.number or report.client_id not in self.selected:
            return False
        with self._lock:
            if report.client_id in self.accepted:
                return False
            target = self.declined if report.kind == "declined" else self.aborted
            target[report.client_id] = report.reason
        return True

    def decision(self, now: float | None = None) -> str | None:
        """None while open; "complete" or "abandoned" once the closing rule says so."""
        now = now or time.time()
        with self._lock:
            accepted = len(self.accepted)
            answered = accepted + len(set(self.declined) | set(self.aborted))
        if accepted >= self.clients_per_round:
            return "complete"
        if answered >= len(self.selected) or now >= self.deadline:
            return "complete" if accepted >= self.quorum else "abandoned"
        return None

    def close(self, now: float | None = None) -> RoundOutcome:
        now = now or time.time()
        complete = len(self.accepted) >= self.quorum and len(self.accepted) > 0
        with self._lock:
            self.closed = True
            silent = [c for c in self.selected if c not in self.accepted and c not in self.declined
                      and c not in self.aborted]
            record = {
                "round": self.number,
                "session": self.session,
                "status": "complete" if complete else "abandoned",
                "selected": len(self.selected),
                "accepted": len(self.accepted),
                "declined": len(self.declined),
                "declined_by_gate": _gate_counts(self.declined),
                "aborted": len(self.aborted),
                "timed_out": len(silent),
                "rejected": dict(self.rejected),
                "clipped": self.clipped,
                "examples": int(sum(self.example_counts.values())),
                "bytes_up": self.bytes_up,
                "started_at": self.started_at,
                "duration_seconds": now - self.started_at,
                "client_metrics": self.client_metrics,
                "update_norms": self.norms,
            }
            aggregate = self.aggregator.result() if complete else None
            cosines = cosine_to_aggregate(self.sketches, self.example_counts)
        return RoundOutcome(complete, aggregate, record, cosines)


def _gate_counts(reasons: dict[str, str]) -> dict[str, int]:
    """Declines by gate name, from reasons like "idle: CPU busy ...; charged: on battery"."""
    counts: Counter = Counter()
    for reason in reasons.values():
        for part in reason.split("; "):
            counts[part.split(":", 1)[0].strip() or "unknown"] += 1
    return dict(counts)
