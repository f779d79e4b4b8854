"""A device's high-water mark of the aggregator's announcements: which run it follows and how far it has seen.

The rule (protocol v2, README "Run identity and ordering"): within one run, announcements are ordered by
``(epoch, round, issued_at)``; an announcement below the mark is a replay and refused. A different run is
followed only if it began later (``run_started_at``) than the one the device follows; otherwise it is stale.
The same announcement delivered again (the retained copy after a reconnect, or the aggregator re-asserting its
retained topics) is followed as before: it is harmless, since a device trains at most once per session.
A `closed` or `done` announcement advances the mark like any other, and ends the session it names: training
for that session stops.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedlite.fsutil import write_atomic
from fedlite.protocol.messages import RoundAnnouncement


@dataclass(frozen=True)
class Watermark:
    run: str = ""
    run_started_at: float = 0.0
    epoch: int = 0
    round: int = -1
    issued_at: float = 0.0
    done_session: str = ""  # the last session this device finished (trained and uploaded)
    session: str = ""  # the session of the announcement at the mark
    state: str = ""  # and its state: open | closed | done

    def key(self) -> tuple[int, int, float]:
        return self.epoch, self.round, self.issued_at


def announcement_key(a: RoundAnnouncement) -> tuple[int, int, float]:
    return a.epoch, a.round, a.issued_at


def judge(mark: Watermark, a: RoundAnnouncement) -> str | None:
    """Why `a` must be refused given the mark (a counter reason), or None to follow it."""
    if not a.run:
        return "no_run"
    if a.run != mark.run:
        return "stale_run" if mark.run and a.run_started_at <= mark.run_started_at else None
    key = announcement_key(a)
    if key < mark.key():
        return "replayed"
    return None


def advance(mark: Watermark, a: RoundAnnouncement) -> Watermark:
    """The mark after following `a` (a new run starts from it)."""
    done = mark.done_session if a.run == mark.run else ""
    return Watermark(a.run, a.run_started_at, a.epoch, a.round, a.issued_at, done, a.session, a.state)


def superseded(mark: Watermark, a: RoundAnnouncement) -> bool:
    """True once the device has followed a later attempt (another run, a later round, a retry) than `a`'s, or
    the close of `a`'s own session: training for `a` is pointless. In asynchronous rounds (the plan's
    `max_staleness` > 0) later versions do not end it while `a` is at most that many behind, in the same process
    start of the aggregator, and the run is not done."""
    if mark.run != a.run:
        return True
    if a.plan.max_staleness > 0:
        return mark.state == "done" or mark.epoch != a.epoch or mark.round - a.round > a.plan.max_staleness
    if (mark.epoch, mark.round) > (a.epoch, a.round):
        return True
    return mark.session != a.session or mark.state != "open"


def finished(mark: Watermark, session: str) -> Watermark:
    return replace(mark, done_session=session)


def load(path: Path) -> Watermark:
    try:
        raw = json.loads(path.read_text())
        return Watermark(str(raw["run"]), float(raw["run_started_at"]), int(raw["epoch"]), int(raw["round"]),
                         float(raw["issued_at"]), str(raw["done_session"]), str(raw.get("session", "")),
                         str(raw.get("state", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return Watermark()


def save(path: Path, mark: Watermark) -> None:
    write_atomic(path, json.dumps(asdict(mark)).encode())
