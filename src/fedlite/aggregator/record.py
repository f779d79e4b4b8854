"""The typed round record: what one round attempt did, as history.json, KPIs, metrics and reports read it."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    """One round attempt, as written to history.json (`to_dict`) and read back (`from_dict`).

    ``status`` is complete | abandoned | failed; ``close_reason`` quorum (K accepted before the deadline),
    deadline (the quorum at the deadline), abandoned or failed. Counts are devices; bytes are payload bytes. A
    selected device that had not answered when the attempt closed is ``cut_off`` if it closed before its deadline
    (it had K updates, or the aggregator stopped) and ``timed_out`` only if the deadline passed.
    The evaluation, privacy and KPI fields are filled by the commit of a complete round.
    """

    round: int
    session: str
    status: str
    close_reason: str
    selected: int
    accepted: int
    declined: int = 0
    declined_by_gate: dict[str, int] = field(default_factory=dict)
    aborted: int = 0
    timed_out: int = 0  # selected, silent at the deadline
    cut_off: int = 0  # selected, still training when the attempt closed before its deadline (history before: 0)
    rejected: dict[str, int] = field(default_factory=dict)
    clipped: int = 0
    norm_bound: float | None = None
    norm_flagged: list[str] = field(default_factory=list)
    norm_refused: list[str] = field(default_factory=list)
    examples_capped: int = 0
    max_weight: float | None = None
    examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0  # measured: what the devices whose update was accepted received for it (`downloads` of them)
    downloads: int = 0
    started_at: float = 0.0
    duration_seconds: float = 0.0
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)
    staleness: dict[str, int] = field(default_factory=dict)  # asynchronous rounds: versions behind, per update
    # several aggregators: updates merged from each one's partial sum (the coordinator's own under its name), and
    # updates a member had claimed whose partial sum never arrived (not counted, not in the aggregate)
    aggregators: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    # a secure round: its ring, clip bound, threshold, survivors and drop-outs, and the inputs' mean norm
    secure_aggregation: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # why a failed attempt was not committed
    accuracy: float | None = None
    loss: float | None = None
    privacy: dict[str, Any] | None = None
    epsilon: float | None = None
    delta: float | None = None
    kpis: dict[str, Any] = field(default_factory=dict)
    completed_at: float | None = None
    refusals: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by other versions, kept as they were

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.privacy is None:
            del out["privacy"]
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known.setdefault("session", "")
        known.setdefault("status", "complete")
        known.setdefault("close_reason", "")
        known.setdefault("selected", 0)
        known.setdefault("accepted", 0)
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


def records(history: Sequence[RoundRecord | Mapping[str, Any]]) -> list[RoundRecord]:
    """Rounds as typed records, whether given as records or as history.json's dicts."""
    return [entry if isinstance(entry, RoundRecord) else RoundRecord.from_dict(dict(entry)) for entry in history]


def gate_counts(reasons: dict[str, str]) -> dict[str, int]:
    """Declines by gate name, from reasons like "idle: CPU busy ...; charged: on battery"."""
    counts: Counter = Counter()
    for reason in reasons.values():
        for part in reason.split("; "):
            counts[part.split(":", 1)[0].strip() or "unknown"] += 1
    return dict(counts)
