"""The retained round topic: an attempt's open and closed announcements, and the run's final "done"."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from fedlite.aggregator.config import TrainingSection
from fedlite.aggregator.downlink import RoundWeights
from fedlite.aggregator.record import RoundRecord
from fedlite.aggregator.retained import RetainedTopics
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.run_identity import RunIdentity
from fedlite.protocol import topics
from fedlite.protocol.messages import RoundAnnouncement, SecurePlan, TrainingPlan, to_json
from fedlite.protocol.selection import nobody


@dataclasses.dataclass
class Announcer:
    """Signs and retains what devices read on the round topic (lifecycle open → closed → ... → done)."""

    federation: str
    model_hash: str
    training: TrainingSection  # the run's plan ([training]), broadcast per round by `TrainingSection.plan`
    retained: RetainedTopics
    identity: Callable[[], RunIdentity | None]
    _opened: RoundAnnouncement | None = None  # the current attempt's open announcement

    def open(self, attempt: RoundAttempt, weights: RoundWeights, plan: TrainingPlan | None = None,
             secure: SecurePlan | None = None) -> None:
        """Announce the attempt's session and selection (`plan`: this attempt's, instead of the run's for its
        round; `secure`: a secure-aggregation round's arithmetic)."""
        if attempt.selection is None:
            raise ValueError(f"round {attempt.number} has no selection to announce")
        self._opened = RoundAnnouncement(
            federation=self.federation, round=attempt.number, model_hash=self.model_hash,
            model_topic=topics.model_topic(self.federation, self.model_hash),
            weights_topic=weights.topic, weights_digest=weights.digest, delta_base=weights.delta_base,
            selection=attempt.selection,
            deadline=attempt.deadline, plan=plan or self.training.plan(attempt.number), session=attempt.session,
            issued_at=time.time(), secure=secure,
            **self._run_fields(),
        )
        self._publish(self._opened)

    def closed(self, record: RoundRecord) -> None:
        """The open attempt is over (same run, epoch, round and session): devices wait for the next."""
        opened = self._opened
        if opened is None or opened.session != record.session:
            return
        self._publish(dataclasses.replace(opened, state="closed", accepted=record.accepted,
                                          reason=record.close_reason, issued_at=max(time.time(), opened.issued_at)))

    def done(self, total: int, last: RoundRecord | None) -> None:
        """Every round is done: the last complete attempt's session, its accepted count and why it closed."""
        self._publish(RoundAnnouncement(
            federation=self.federation, round=total, model_hash=self.model_hash,
            model_topic=topics.model_topic(self.federation, self.model_hash), weights_topic="", selection=nobody(),
            deadline=0.0, plan=self.training.plan(total), session=last.session if last else "", state="done",
            issued_at=time.time(),
            accepted=last.accepted if last else 0, reason=last.close_reason if last else "", **self._run_fields(),
        ))

    def _publish(self, announcement: RoundAnnouncement) -> None:
        self.retained.broadcast(topics.round_topic(self.federation), to_json(announcement))

    def _run_fields(self) -> dict[str, Any]:
        ident = self.identity()
        return {"run": ident.run, "run_started_at": ident.started_at, "epoch": ident.epoch} if ident else {}
