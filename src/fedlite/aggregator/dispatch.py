"""Devices' messages to the aggregator: classified on the network thread, handled by the inbox's workers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.inbox import Inbox, Item
from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.metrics import Metrics
from fedlite.aggregator.retained import RetainedTopics
from fedlite.aggregator.rollout import RolloutManager
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.validation import Rejected, check_metrics
from fedlite.protocol import topics
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import DeviceReport, DeviceStatus, from_json

log = logging.getLogger("fedlite.aggregator")


class Dispatcher:
    """Routes each message: statuses into the fleet, updates and reports through the inbox to the open attempt,
    the aggregator's own retained topics to their keeper; every refusal goes to the ledger."""

    def __init__(self, federation: str, fleet: Fleet, metrics: Metrics, ledger: Ledger, retained: RetainedTopics,
                 rollout: RolloutManager, current: Callable[[], RoundAttempt | None], run: Callable[[], str],
                 workers: int) -> None:
        self.federation, self.fleet, self.metrics, self.ledger = federation, fleet, metrics, ledger
        self.retained, self.rollout, self.current, self.run = retained, rollout, current, run
        self.inbox = Inbox(self._handle_item, self._refuse_busy, workers=workers)
        self.cluster: Any = None  # cluster.coordinator.ClusterCoordinator when several aggregators share the work
        self.secure: Callable[[], Any] = lambda: None  # the secure round's exchange while one runs
        self.on_evaluation: Callable[[str, dict[str, float]], bool] = lambda client, metrics: False

    # --- the network thread: classify and enqueue only ------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        if self.cluster is not None and (cluster := topics.parse_cluster(topic)) is not None:
            if cluster[0] == self.federation:
                self.cluster.on_message(topic, cluster[1], cluster[2], payload)
            return
        parsed = topics.parse(topic)
        if parsed is None or parsed[0] != self.federation:
            return
        _, kind, client = parsed
        if kind == "updates":
            self.metrics.update_received(len(payload))
            self.inbox.put(Item("update", client, payload))
        elif kind == "reports":
            self.inbox.put(Item("report", client, payload))
        elif kind == "secagg":
            self.inbox.put(Item("secagg", client, payload))
        elif kind == "status" and payload:  # small and bounded: parsed here, straight into the fleet
            self._on_json("status", client, payload, DeviceStatus, self.fleet.update)
        elif kind in topics.AGGREGATOR_KINDS:
            self.retained.observe(topic, payload)

    # --- the inbox's workers ----------------------------------------------------------------------

    def _handle_item(self, item: Item) -> None:
        if item.kind == "update":
            self._on_update(item.client, item.payload)
        elif item.kind == "partial":
            self.cluster.on_partial(item.client, item.payload)
        elif item.kind == "secagg":
            self._on_secagg(item.client, item.payload)
        else:
            self._on_json("report", item.client, item.payload, DeviceReport, self._on_report)

    def _refuse_busy(self, item: Item) -> None:
        self.refuse(item.kind, "busy", f"{item.kind} from {item.client}: the inbox is full")

    def _on_secagg(self, client: str, payload: bytes) -> None:
        exchange = self.secure()
        if exchange is None:
            self.refuse("secagg", "late", f"secure message from {client}: no secure round is open")
            return
        exchange.on_message(client, payload)

    def _on_update(self, client: str, payload: bytes) -> None:
        if self.secure() is not None:
            self.refuse("update", "secure_aggregation", f"update from {client} in the clear during a secure round")
            return
        attempt = self.current()
        if attempt is None:
            self.refuse("update", "late", f"update from {client} before any round")
            return
        try:
            attempt.offer(payload, client)
        except Rejected as exc:
            self.refuse("update", exc.reason, f"update from {client}: {exc}", attempt.number)

    def _on_json(self, kind: str, client: str, payload: bytes, cls: type, handle: Any) -> None:
        try:
            message = from_json(cls, payload)
        except ProtocolError as exc:
            self.refuse(kind, exc.reason, f"{kind} from {client}: {exc}")
            return
        if message.client_id != client:
            self.refuse(kind, "sender", f"{client} wrote a {kind} for {message.client_id}")
            return
        handle(message)

    def _on_report(self, report: DeviceReport) -> None:
        problem = check_metrics(report.metrics)
        if problem:
            self.refuse("report", "metrics", f"{report.kind} report from {report.client_id}: {problem}")
            return
        if report.kind == "deployed":  # an inference model installed: the rollout's business, not a round's
            self.rollout.on_report(report)
            return
        if report.kind == "evaluation":  # a device's own numbers (personalization), not an answer to a round
            if report.run != self.run():
                self.refuse("report", "run", f"evaluation report from {report.client_id} for run {report.run[:16]!r}")
            elif self.on_evaluation(report.client_id, report.metrics):
                self.metrics.report(report.kind)
            else:
                self.refuse("report", "metrics", f"evaluation report from {report.client_id} without the "
                            "personalized_accuracy and global_accuracy it needs")
            return
        attempt = self.current()
        if report.run != self.run():
            self.refuse("report", "run", f"{report.kind} report from {report.client_id} for run "
                        f"{report.run[:16]!r}", report.round)
        elif attempt is None or attempt.closed or not attempt.announced(report.session):
            reason = "future" if attempt is not None and report.round > attempt.number else "late"
            self.refuse("report", reason, f"{report.kind} report from {report.client_id} for round {report.round} "
                        f"session {report.session[:16]!r}, which is not open", report.round)
        elif attempt.report(report):
            self.metrics.report(report.kind)
            log.info("round %d: %s %s: %s", report.round, report.client_id, report.kind, report.reason)

    def refuse(self, kind: str, reason: str, detail: str, number: int | None = None) -> None:
        """Count and log (bounded) one refused message, under the open round's number unless given."""
        attempt = self.current()
        if number is None and attempt is not None and not attempt.closed:
            number = attempt.number
        self.ledger.refuse(kind, reason, number, detail)
