"""The aggregator process: bootstrap → select → broadcast → run attempt → commit → checkpoint, round after round."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator import orchestrators
from fedlite.aggregator.bootstrap import (
    Evaluator,
    RunFailed,
    broker_settings,
    client_id,
    initial_model,
    load_test_set,
    resume,
)
from fedlite.aggregator.checkpoint import check_writable
from fedlite.aggregator.cluster.coordinator import ClusterCoordinator
from fedlite.aggregator.commit import CommitRefused, Committer, write_history
from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.dispatch import Dispatcher
from fedlite.aggregator.downlink import Downlink
from fedlite.aggregator.export import Exporter, redo_missed_exports
from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.fleet_writer import FleetWriter
from fedlite.aggregator.kpis import KpiTracker, Sketcher
from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.metrics import Metrics
from fedlite.aggregator.record import RoundRecord, records
from fedlite.aggregator.registry import Registry
from fedlite.aggregator.retained import RetainedTopics
from fedlite.aggregator.rollout import RolloutManager
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.run_identity import RunIdentity
from fedlite.aggregator.strategies import make_server_optimizer
from fedlite.fsutil import StorageError, ensure_dir
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, Limits, encode_model, update_limits
from fedlite.protocol.layout import num_params, weight_specs
from fedlite.protocol.signing import Signer
from fedlite.protocol.transport import Link
from fedlite.sdnotify import Notifier

__all__ = ["Aggregator", "RunFailed"]

log = logging.getLogger("fedlite.aggregator")
HEALTH_SECONDS = 120.0  # /healthz says "stalled" when the service loop has not ticked for this long


class Aggregator:
    """One federation's aggregator: owns the run's state and the parts that act on it (see each module)."""

    log = log

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.federation = config.federation.name
        self.state_dir = Path(config.federation.state_dir)
        self.models_dir = self.state_dir / "models"
        ensure_dir(self.models_dir)
        self.metrics = Metrics(self.federation)
        self.fleet = Fleet(config.rounds.status_ttl_seconds)
        signer = Signer.from_file(config.signing.key_file) if config.signing.key_file else None
        if signer is None:
            log.warning("broadcasts are not signed: agents that pin a key will refuse them ([signing] key_file)")
        self.retained = RetainedTopics(signer, self.metrics)
        self.rollout = RolloutManager(config.rollout, Registry(self.state_dir), self.federation, self.fleet,
                                      self.retained.broadcast, on_storage_failure=self._storage_failed)
        self.storage_fault: StorageError | None = None  # set by a background thread's failed write
        self.stop_event = threading.Event()
        self.ledger = Ledger(self.metrics)
        self.history: list[dict[str, Any]] = []
        self.kpis = KpiTracker(config.kpis)
        self.fleet_writer = FleetWriter(self.state_dir / "fleet.json", self.federation, self.fleet, self.kpis)
        self.current: RoundAttempt | None = None
        self.secure: Any = None  # secure_exchange.SecureExchange while a secure round runs
        self.limits = Limits(max_payload_bytes=config.server.max_update_bytes)
        self.test_set = load_test_set(config.evaluation.test_data)
        self.notifier = Notifier()
        self._last_tick = time.monotonic()
        self.run_identity: RunIdentity | None = None
        self.dispatch = Dispatcher(self.federation, self.fleet, self.metrics, self.ledger, self.retained,
                                   self.rollout, lambda: self.current, self.run_id,
                                   workers=max(1, min(2, os.cpu_count() or 1)))
        self.inbox = self.dispatch.inbox
        self.link = Link(broker_settings(config), client_id(config), self.dispatch.on_message,
                         on_connect=self.retained.reconnected)
        self.retained.attach(self.link)
        self.cluster = ClusterCoordinator(self, signer) if config.cluster.member and signer else None
        self.dispatch.cluster = self.cluster
        self.dispatch.secure = lambda: self.secure
        self.dispatch.on_evaluation = self.kpis.evaluation

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        check_writable(self.state_dir / "checkpoints")  # fail before devices train a round that could not be saved
        manifest, train_bytes, weights = initial_model(self.config, self.models_dir, self._representative())
        self._load_model(manifest, train_bytes)
        evaluator = Evaluator(train_bytes, manifest, self.test_set)
        self.kpis.initial_accuracy = evaluator.evaluate(weights)["accuracy"]
        server = self.config.server
        optimizer = make_server_optimizer(server.optimizer, config=server.strategies[server.optimizer])
        done, weights, opt_state, self.history = resume(self.state_dir, self.model_hash, weights, optimizer)
        self.run_identity = RunIdentity.start(self.state_dir)
        log.info("run %s, epoch %d (process start %d of this run)", self.run_identity.run,
                 self.run_identity.epoch, self.run_identity.epoch)
        self.kpis.replay(self.history)
        exporter = Exporter(self.config.model, self.models_dir, self._representative(), self._storage_failed)
        redo_missed_exports(exporter, self.state_dir / "checkpoints", self.history, done, self.config.rounds.total)
        committer = Committer(self.config, optimizer, evaluator.evaluate, self.kpis, self.ledger, self.metrics,
                              self.fleet, exporter, self.state_dir,
                              {"federation": self.federation, "model_hash": self.model_hash}, self.history)
        orchestrator = orchestrators.make(self.config.rounds.mode, self)
        self._connect()
        self.retained.broadcast(topics.model_topic(self.federation, self.model_hash), self.model_payload)
        self.rollout.start()
        try:
            for number in range(done + 1, self.config.rounds.total + 1):
                if self._budget_spent(number):
                    self._serve_after_rounds()
                    break
                committed = self._run_round(number, weights, opt_state, committer, orchestrator)
                if committed is None:
                    break  # stopping
                weights, opt_state = committed
            else:
                complete = [r for r in records(self.history) if r.complete]
                self.announcer.done(self.config.rounds.total, complete[-1] if complete else None)
                self.downlink.finish()
                log.info("federation %s: all %d rounds done", self.federation, self.config.rounds.total)
                self.fleet_writer.end()
                self._serve_after_rounds()
        except StorageError as exc:
            self._storage_failed(exc)
            raise
        finally:
            self.rollout.stop()
            self.inbox.stop()
            # pending exports are finished (feeding the watchdog), unless storage failed: then they are redone
            # at the next start
            exporter.close(self.notifier.ping, wait=self.storage_fault is None)
            if self.storage_fault is None:
                self._wrap_up()
            self.notifier.send("STOPPING=1")
            self.link.close()
        if self.storage_fault is not None:
            raise self.storage_fault
        return self.history

    def stop(self) -> None:
        """Safe from a signal handler (takes no lock): the round wait sees it within a second."""
        self.stop_event.set()

    def _storage_failed(self, exc: StorageError) -> None:
        """A write failed (any thread): stop now, and `run` raises it (the CLI's exit code 3)."""
        if self.storage_fault is None:
            self.storage_fault = exc
        self.stop()

    def _load_model(self, manifest: dict[str, Any], train_bytes: bytes) -> None:
        """The run's model: its hash, layout, update limits, sketcher, announcer and the retained model payload."""
        from fedlite.aggregator.announcer import Announcer

        self.manifest, self.model_hash = manifest, manifest["model_hash"]
        self.specs = weight_specs(manifest)
        self.sketcher = Sketcher(num_params(manifest))
        self.limits = update_limits([tuple(s) for _, s in self.specs], self.limits, self.config.training.encoding)
        self.announcer = Announcer(self.federation, self.model_hash, self.config.training, self.retained,
                                   lambda: self.run_identity)
        model = self.config.model
        self.downlink = Downlink(self.federation, self.model_hash, manifest, self.retained, self.run_id,
                                 dtype=model.downlink_dtype, delta_encoding=model.downlink_delta)
        self.model_payload = encode_model(train_bytes, Header(kind="model", federation=self.federation, round=0,
                                                              model_hash=self.model_hash, extra={"manifest": manifest}))

    def _connect(self) -> None:
        share = self.config.broker.share_group or None
        for topic in topics.aggregator_retained(self.federation):  # to repair what the broker holds
            self.link.subscribe(topic)
        self.inbox.start()
        self.link.subscribe(topics.all_statuses(self.federation))
        self.link.subscribe(topics.all_updates(self.federation, share))
        # with several aggregators the coordinator alone reads the reports: its closing rule counts them
        self.link.subscribe(topics.all_reports(self.federation, None if self.cluster else share))
        if self.config.secure_aggregation.enabled:
            self.link.subscribe(topics.all_secagg(self.federation))
        for topic in self.cluster.subscriptions() if self.cluster else []:
            self.link.subscribe(topic)
        self.link.connect()
        if self.config.metrics.prometheus_port:
            self.metrics.serve(self.config.metrics.prometheus_port, self.config.metrics.prometheus_host, self.health)
        self.notifier.send(f"READY=1\nSTATUS=federation {self.federation}")

    # --- one round ----------------------------------------------------------------------------

    def _run_round(self, number: int, weights: dict[str, np.ndarray], opt_state: Any, committer: Committer,
                   orchestrator: orchestrators.Orchestrator) -> tuple[dict[str, np.ndarray], Any] | None:
        """Attempts at one round until one commits; None when stopping. Failed attempts stay in the history."""
        for attempt in range(1, self.config.rounds.max_attempts + 1):
            outcome = orchestrator.attempt(number, attempt, weights)
            if outcome is None:
                return None
            if outcome.complete:
                try:
                    committed = committer.commit(number, outcome, weights, opt_state)
                    self.fleet_writer.write(number, "done", self.current, force=True)
                    return committed
                except CommitRefused as exc:
                    outcome.record.status, outcome.record.close_reason = "failed", "failed"
                    outcome.record.reason = str(exc)
                    self.announcer.closed(outcome.record)
                    log.error("round %d attempt %d not committed: %s; the round-%d model stays current", number,
                              attempt, exc, number - 1)
            else:
                log.warning("round %d attempt %d abandoned: %d accepted of quorum %d", number, attempt,
                            outcome.record.accepted, self.config.rounds.min_accepted)
            self._record(outcome.record)
        raise RunFailed(f"round {number} was not completed in {self.config.rounds.max_attempts} attempts")

    def _wrap_up(self) -> None:
        """On the way out: register the exports that finished after the rollout thread stopped (the registry lists
        every version), and mark fleet.json ended."""
        try:
            for version in self.rollout.registry.sync():
                log.info("registered version %d", version)
            self.fleet_writer.end()
        except StorageError as exc:
            log.error("could not record the end of the run: %s", exc)

    def _record(self, record: RoundRecord) -> None:
        """Append a round record, with every refusal since the previous one, and write history.json."""
        record.refusals = self.ledger.take()
        self.history.append(record.to_dict())
        write_history(self.state_dir, self.history)

    # --- what orchestrators use ---------------------------------------------------------------

    def housekeeping(self, number: int, phase: str) -> None:
        """While a round waits: feed the watchdog, repair the retained topics, refresh fleet.json."""
        self.notifier.ping()
        self._last_tick = time.monotonic()
        self.retained.repair()
        self.fleet_writer.write(number, phase, self.current)

    def health(self) -> dict[str, Any]:
        """/healthz: ok while the service loop runs (it feeds this as it feeds the watchdog)."""
        quiet = time.monotonic() - self._last_tick
        return {"status": "ok" if quiet < HEALTH_SECONDS else "stalled", "seconds_since_tick": round(quiet, 1),
                "round": self.current.number if self.current is not None else None}

    def selectable(self) -> list[str]:
        """Eligible devices that can encode the plan's updates, without those flagged as anomalous when the operator
        excludes them."""
        eligible = self.fleet.eligible(encoding=self.config.training.encoding)
        if self.config.kpis.exclude_flagged:
            flagged = set(self.kpis.anomalous())
            eligible = [c for c in eligible if c not in flagged]
        return eligible

    def refuse(self, kind: str, reason: str, detail: str, number: int | None = None) -> None:
        self.dispatch.refuse(kind, reason, detail, number)

    def run_id(self) -> str:
        """The run's identity ("" before it started)."""
        return self.run_identity.run if self.run_identity else ""

    def _budget_spent(self, number: int) -> bool:
        """With [privacy] max_epsilon: whether round `number` would take ε beyond it (then say so, and end)."""
        p = self.config.privacy
        if not (p.enabled and p.max_epsilon):
            return False
        from fedlite.aggregator.strategies import dp

        projected = dp.next_round_epsilon(self.history, p.delta)
        if projected <= p.max_epsilon:
            return False
        complete = [r for r in records(self.history) if r.complete]
        spent = complete[-1].epsilon if complete and complete[-1].epsilon is not None else 0.0
        log.warning("federation %s: privacy budget reached: epsilon %.3g spent, round %d would take it to %.3g, "
                    "beyond max_epsilon %.3g (at delta %g); training stops here", self.federation, spent, number,
                    projected, p.max_epsilon, p.delta)
        self.announcer.done(number - 1, complete[-1] if complete else None)
        self.downlink.finish()
        self.notifier.status(f"privacy budget reached after round {number - 1} (epsilon {spent:.3g})")
        return True

    def _serve_after_rounds(self) -> None:
        """With [rollout] serve_after_rounds: keep serving rollouts and the registry until stopped."""
        if not self.config.rollout.serve_after_rounds:
            return
        log.info("serving rollouts after the last round until stopped")
        while not self.stop_event.wait(1.0):
            self.notifier.ping()
            self._last_tick = time.monotonic()
            self.retained.repair()

    def _representative(self) -> np.ndarray | None:
        if self.test_set is None:
            return None
        return self.test_set[0][: self.config.evaluation.calibration_examples]
