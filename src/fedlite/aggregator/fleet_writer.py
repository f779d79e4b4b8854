"""The dashboard's view of the fleet: state_dir/fleet.json, written at most once a second and, for large fleets,
at most 5 % of the time (after a write that took t seconds, the next waits at least 20 t). Once the rounds are
over (or the aggregator stops) it is written once more with ``ended_at``: no status is collected after that."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.kpis import KpiTracker
from fedlite.fsutil import write_atomic


class FleetWriter:
    """Every device's last status, freshness and flags, and the current round, for the dashboard."""

    def __init__(self, path: Path, federation: str, fleet: Fleet, kpis: KpiTracker) -> None:
        self.path, self.federation, self.fleet, self.kpis = path, federation, fleet, kpis
        self._written = 0.0
        self._interval = 1.0
        self._last: tuple[int, str, Any | None] = (0, "waiting", None)
        self.ended_at: float | None = None

    def write(self, number: int, state: str, attempt: Any | None, force: bool = False) -> None:
        now = time.time()
        self._last = (number, state, attempt)
        if not force and now - self._written < self._interval:
            return
        self._written = now
        started = time.process_time()
        self._write(number, state, attempt, now)
        self._interval = max(1.0, 20 * (time.process_time() - started))

    def end(self) -> None:
        """The rounds are over, or the aggregator stops: the last write, marked ``ended_at`` (the first end kept)."""
        now = time.time()
        self.ended_at = self.ended_at or now
        self._written = now
        self._write(*self._last, now)

    def _write(self, number: int, state: str, attempt: Any | None, now: float) -> None:
        drift, anomaly = set(self.kpis.drifting()), set(self.kpis.anomalous())
        devices = [{
            "client_id": cid, "state": view.status.state, "stale": not self.fleet.fresh(view, now),
            "eligible": view.status.eligible, "failed_gates": view.status.failed_gates, "last_seen": view.last_seen,
            "received_at": view.received_at, "deployed_model": view.status.deployed_model,
            "weights_run": view.status.weights_run, "weights_round": view.status.weights_round,
            "flags": [name for name, ids in (("drift", drift), ("anomaly", anomaly)) if cid in ids],
        } for cid, view in sorted(self.fleet.snapshot().items())]
        current = {"round": number, "state": state, "selected": len(attempt.selected) if attempt else 0,
                   "accepted": len(attempt.accepted) if attempt else 0,
                   "deadline": attempt.deadline if attempt else None}
        write_atomic(self.path, json.dumps({"updated_at": now, "ended_at": self.ended_at, "federation": self.federation,
                                            "status_ttl_seconds": self.fleet.ttl, "counts": self.fleet.counts(now),
                                            "devices": devices, "current_round": current},
                                           separators=(",", ":")).encode())
