"""The aggregator process: runs rounds over MQTT, aggregates validated updates, checkpoints, re-exports."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.checkpoint import HISTORY_FILE, check_writable, load_for_resume
from fedlite.aggregator.commit import CommitRefused, Committer, write_history
from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.export import Exporter, export_round, redo_missed_exports, version_dir
from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.fleet_writer import FleetWriter
from fedlite.aggregator.inbox import Inbox, Item
from fedlite.aggregator.influence import reference_norms, weight_cap
from fedlite.aggregator.kpis import KpiTracker, Sketcher
from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.metrics import Metrics
from fedlite.aggregator.registry import Registry
from fedlite.aggregator.retained import RetainedTopics
from fedlite.aggregator.rollout import RolloutManager
from fedlite.aggregator.rounds import RoundAttempt, RoundOutcome, select
from fedlite.aggregator.run_identity import RunIdentity
from fedlite.aggregator.strategies import dp, make_aggregator, make_server_optimizer
from fedlite.aggregator.validation import Rejected, RoundContext, check_metrics
from fedlite.fsutil import StorageError, ensure_dir
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, Limits, encode_model, encode_weights, update_limits
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten, num_params, unflatten, weight_specs
from fedlite.protocol.messages import DeviceReport, DeviceStatus, RoundAnnouncement, from_json, to_json
from fedlite.protocol.selection import Selection, nobody
from fedlite.protocol.signing import Signer
from fedlite.protocol.transport import BrokerSettings, Link

log = logging.getLogger("fedlite.aggregator")


class RunFailed(RuntimeError):
    """The federation cannot go on (e.g. a round stayed below quorum on every attempt)."""


class Aggregator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.federation = config.federation.name
        self.state_dir = Path(config.federation.state_dir)
        self.models_dir = self.state_dir / "models"
        self.checkpoints_dir = self.state_dir / "checkpoints"
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
        self._opened: RoundAnnouncement | None = None  # the current attempt's open announcement
        self.limits = Limits(max_payload_bytes=config.server.max_update_bytes)
        self.test_set = _load_test_set(config.evaluation.test_data)
        self._notifier = _notifier()
        self.inbox = Inbox(self._handle_item, self._refuse_busy, workers=max(1, min(2, os.cpu_count() or 1)))
        self.run_identity: RunIdentity | None = None
        self.link = Link(_broker_settings(config), _client_id(config), self._on_message,
                         on_connect=self.retained.reconnected)
        self.retained.attach(self.link)

    # --- the run ------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        check_writable(self.checkpoints_dir)  # fail before devices train a round that could not be saved
        manifest, train_bytes, weights = self._initial_model()
        self.manifest = manifest
        self.model_hash = manifest["model_hash"]
        self._evaluator = _Evaluator(train_bytes, manifest)
        self._sketcher = Sketcher(num_params(manifest))
        self.limits = update_limits([tuple(s) for _, s in weight_specs(manifest)], self.limits,
                                    self.config.training.encoding)
        self.kpis.initial_accuracy = self._evaluate(weights)["accuracy"]
        server = self.config.server
        optimizer = make_server_optimizer(server.optimizer, config=server.strategies[server.optimizer])
        done, weights, opt_state = self._resume(weights, optimizer)
        self.run_identity = RunIdentity.start(self.state_dir)
        log.info("run %s, epoch %d (process start %d of this run)", self.run_identity.run,
                 self.run_identity.epoch, self.run_identity.epoch)
        self.kpis.replay(self.history)
        exporter = Exporter(self.config.model, self.models_dir, self._representative(), self._storage_failed)
        redo_missed_exports(exporter, self.checkpoints_dir, self.history, done, self.config.rounds.total)
        committer = Committer(self.config, optimizer, self._evaluate, self.kpis, self.ledger, self.metrics,
                              self.fleet, exporter, self.state_dir,
                              {"federation": self.federation, "model_hash": self.model_hash}, self.history)
        self._connect()
        self.model_payload = encode_model(train_bytes, Header(kind="model", federation=self.federation, round=0,
                                                              model_hash=self.model_hash, extra={"manifest": manifest}))
        self.retained.broadcast(topics.model_topic(self.federation, self.model_hash), self.model_payload)
        self.rollout.start()
        try:
            for number in range(done + 1, self.config.rounds.total + 1):
                committed = self._run_round(number, weights, opt_state, committer)
                if committed is None:
                    break  # stopping
                weights, opt_state = committed
            else:
                self._announce_done()
                self._serve_after_rounds()
        except StorageError as exc:
            self._storage_failed(exc)
            raise
        finally:
            self.rollout.stop()
            self.inbox.stop()
            # pending exports are finished (feeding the watchdog), unless storage failed: then they are redone
            # at the next start
            exporter.close(lambda: self._notifier("WATCHDOG=1"), wait=self.storage_fault is None)
            self._notifier("STOPPING=1")
            self.link.close()
        if self.storage_fault is not None:
            raise self.storage_fault
        return self.history

    def stop(self) -> None:
        self.stop_event.set()

    def _storage_failed(self, exc: StorageError) -> None:
        """A write failed (any thread): stop now, and `run` raises it (the CLI's exit code 3)."""
        if self.storage_fault is None:
            self.storage_fault = exc
        self.stop_event.set()

    def _connect(self) -> None:
        share = self.config.broker.share_group or None
        for topic in topics.aggregator_retained(self.federation):  # to repair what the broker holds
            self.link.subscribe(topic)
        self.inbox.start()
        self.link.subscribe(topics.all_statuses(self.federation))
        self.link.subscribe(topics.all_updates(self.federation, share))
        self.link.subscribe(topics.all_reports(self.federation, share))
        self.link.connect()
        if self.config.metrics.prometheus_port:
            self.metrics.serve(self.config.metrics.prometheus_port, self.config.metrics.prometheus_host)
        self._notifier(f"READY=1\nSTATUS=federation {self.federation}")

    def _initial_model(self) -> tuple[dict[str, Any], bytes, dict[str, np.ndarray]]:
        """The round-0 export (made once, then reused): manifest, train.tflite bytes, initial weights."""
        folder = version_dir(self.models_dir, 0)
        if not (folder / "manifest.json").is_file():
            log.info("exporting the initial model to %s", folder)
            export_round(self.config.model, folder, None, self._representative())
        manifest = json.loads((folder / "manifest.json").read_text())
        train_bytes = (folder / "train.tflite").read_bytes()
        return manifest, train_bytes, unflatten(_Evaluator(train_bytes, manifest).get_weights(), manifest)

    def _resume(self, weights: dict[str, np.ndarray], optimizer: Any) -> tuple[int, dict[str, np.ndarray], Any]:
        checkpoint = load_for_resume(self.checkpoints_dir, self.state_dir / HISTORY_FILE)  # refuses a lost history
        if checkpoint is None:
            return 0, weights, optimizer.init(weights)
        if checkpoint.meta.get("model_hash") != self.model_hash:
            raise RunFailed(f"checkpoints in {self.checkpoints_dir} belong to model "
                            f"{checkpoint.meta.get('model_hash')}, not {self.model_hash}: use another state_dir")
        self.history = list(checkpoint.history)
        log.info("resuming after round %d from %s", checkpoint.round, self.checkpoints_dir)
        return checkpoint.round, checkpoint.weights, optimizer.state_from_arrays(checkpoint.optimizer_state)

    # --- one round ----------------------------------------------------------------------------

    def _run_round(self, number: int, weights: dict[str, np.ndarray], opt_state: Any,
                   committer: Committer) -> tuple[dict[str, np.ndarray], Any] | None:
        """Attempts at one round until one commits; None when stopping. Failed attempts stay in the history."""
        for attempt in range(1, self.config.rounds.max_attempts + 1):
            picked = self._wait_and_select(number, attempt)
            if picked is None:
                return None
            outcome = self._collect(number, *picked, weights)
            if outcome is None:
                return None
            if outcome.complete:
                try:
                    committed = committer.commit(number, outcome, weights, opt_state)
                    self.fleet_writer.write(number, "done", self.current, force=True)
                    return committed
                except CommitRefused as exc:
                    outcome.record |= {"status": "failed", "reason": str(exc), "close_reason": "failed"}
                    self._announce_closed(outcome.record)
                    log.error("round %d attempt %d not committed: %s; the round-%d model stays current", number,
                              attempt, exc, number - 1)
            else:
                log.warning("round %d attempt %d abandoned: %d accepted of quorum %d", number, attempt,
                            outcome.record["accepted"], self.config.rounds.min_accepted)
            self._record(outcome.record)
        raise RunFailed(f"round {number} was not completed in {self.config.rounds.max_attempts} attempts")

    def _record(self, record: dict[str, Any]) -> None:
        """Append a round record, with every refusal since the previous one, and write history.json."""
        record["refusals"] = self.ledger.take()
        self.history.append(record)
        write_history(self.state_dir, self.history)

    def _wait_and_select(self, number: int, attempt: int) -> tuple[frozenset[str], Selection] | None:
        r = self.config.rounds
        want = int(np.ceil(r.clients_per_round * (1 + r.over_selection)))
        started, last_log = time.time(), 0.0
        while not self.stop_event.is_set():
            self._notifier("WATCHDOG=1")
            self.retained.repair()
            self.fleet_writer.write(number, "waiting", self.current)
            eligible = self._selectable()
            waited = time.time() - started
            if len(eligible) >= want or (waited >= r.wait_for_devices_seconds and len(eligible) >= r.min_accepted):
                rng = np.random.default_rng([r.seed, number, attempt])
                return select(eligible, r.clients_per_round, r.over_selection, rng)
            if time.time() - last_log > 10:
                log.info("round %d: waiting for eligible devices (%d of %d)", number, len(eligible), want)
                last_log = time.time()
            time.sleep(0.1)
        return None

    def _collect(self, number: int, selected: frozenset[str], selection: Selection,
                 weights: dict[str, np.ndarray]) -> RoundOutcome | None:
        cfg = self.config
        deadline = time.time() + cfg.rounds.deadline_seconds
        attempt = RoundAttempt(
            number=number, session=uuid.uuid4().hex[:12], selected=selected, selection=selection, deadline=deadline,
            clients_per_round=cfg.rounds.clients_per_round, quorum=cfg.rounds.min_accepted,
            context=self._context(number, selected), limits=self.limits,
            aggregator=self._round_aggregator(number), sketcher=self._sketcher, **self._influence(selected),
        )
        weights_payload = encode_weights(weights, Header(kind="weights", federation=self.federation, round=number,
                                                         model_hash=self.model_hash, run=self._run()),
                                         dtype=cfg.model.downlink_dtype)
        bytes_down = self._bytes_down(selected, len(weights_payload))
        self.retained.broadcast(topics.weights_topic(self.federation, number), weights_payload)
        self.current = attempt
        self._opened = self._announcement(attempt)
        self.retained.broadcast(topics.round_topic(self.federation), to_json(self._opened))
        log.info("round %d: selected %d devices, deadline in %.0f s", number, len(selected),
                 cfg.rounds.deadline_seconds)
        while attempt.decision() is None:
            if self.stop_event.wait(0.05):
                self._announce_closed(attempt.close(abandon=True).record)  # stopping: nobody collects it
                return None
            self._notifier("WATCHDOG=1")
            self.retained.repair()
            self.fleet_writer.write(number, "open", self.current)
        outcome = attempt.close()
        self._announce_closed(outcome.record)
        for client in attempt.refused_after_hold:  # refused once the warm-up fixed the norm bound
            self._refuse("update", "norm_outlier", f"update from {client}: its norm is an outlier", number)
        outcome.record["bytes_down"] = bytes_down
        self.retained.clear(topics.weights_topic(self.federation, number))
        return outcome

    def _influence(self, selected: frozenset[str]) -> dict[str, Any]:
        """The round's bounds on one device's influence (see `influence`): weight cap and adaptive norm bound."""
        s = self.config.server
        advertised = [view.status.num_examples for cid, view in self.fleet.snapshot().items() if cid in selected]
        bounds: dict[str, Any] = {"max_weight": weight_cap(advertised, s.example_multiple, s.max_examples)}
        if s.norm_multiple > 0 and not self.config.privacy.enabled:  # DP clips every update to S already
            bounds |= {"norm_reference": reference_norms(self.history, s.norm_window),
                       "norm_multiple": s.norm_multiple, "refuse_multiple": s.norm_refuse_multiple,
                       "warmup": s.norm_warmup}
        return bounds

    def _round_aggregator(self, number: int) -> Any:
        cfg, specs = self.config, weight_specs(self.manifest)
        p = cfg.privacy
        if p.enabled:  # DP-FedAvg: equal weights, noise on the sum, fixed denominator K
            params = dp.DpParams(p.clip_norm, p.noise_multiplier, float(cfg.rounds.clients_per_round))
            return dp.DpMeanAggregator(specs, params, dp.noise_rng(p.seed, number))
        return make_aggregator(cfg.server.aggregation, specs, config=cfg.server.strategies[cfg.server.aggregation])

    def _selectable(self) -> list[str]:
        """Eligible devices that can encode the plan's updates, without those flagged as anomalous when the operator
        excludes them."""
        eligible = self.fleet.eligible(encoding=self.config.training.encoding)  # devices that can encode the plan's
        if self.config.kpis.exclude_flagged:
            flagged = set(self.kpis.anomalous())
            eligible = [c for c in eligible if c not in flagged]
        return eligible

    def _context(self, number: int, selected: frozenset[str]) -> RoundContext:
        s = self.config.server
        bound, policy = s.max_update_norm, s.norm_policy
        if self.config.privacy.enabled:  # every update clipped to S on admission
            bound, policy = self.config.privacy.clip_norm, "clip"
        return RoundContext(
            federation=self.federation, round=number, model_hash=self.model_hash, manifest=self.manifest,
            selected=frozenset(selected), accepted=set(), max_examples=s.max_examples,
            max_update_norm=bound, norm_policy=policy, max_abs_value=s.max_abs_value, run=self._run(),
            encoding=self.config.training.encoding,
        )

    def _run(self) -> str:
        return self.run_identity.run if self.run_identity else ""

    def _announcement(self, attempt: RoundAttempt) -> RoundAnnouncement:
        if attempt.selection is None:
            raise ValueError(f"round {attempt.number} has no selection to announce")
        return RoundAnnouncement(
            federation=self.federation, round=attempt.number, model_hash=self.model_hash,
            model_topic=topics.model_topic(self.federation, self.model_hash),
            weights_topic=topics.weights_topic(self.federation, attempt.number), selection=attempt.selection,
            deadline=attempt.deadline, plan=self.config.training, session=attempt.session, issued_at=time.time(),
            **self._run_fields(),
        )

    def _announce_closed(self, record: dict[str, Any]) -> None:
        """The round topic says the open attempt is over (same run, epoch, round and session): devices wait."""
        opened = self._opened
        if opened is None or opened.session != record["session"]:
            return
        closed = dataclasses.replace(opened, state="closed", accepted=record["accepted"],
                                     reason=record["close_reason"], issued_at=max(time.time(), opened.issued_at))
        self.retained.broadcast(topics.round_topic(self.federation), to_json(closed))

    def _run_fields(self) -> dict[str, Any]:
        ident = self.run_identity
        return {"run": ident.run, "run_started_at": ident.started_at, "epoch": ident.epoch} if ident else {}

    def _bytes_down(self, selected: frozenset[str], weights_bytes: int) -> int:
        """Payload bytes the broker delivers to the selected devices: weights, plus the model where not cached."""
        uncached = sum(1 for c in selected if not self.fleet.has_model(c, self.model_hash))
        return weights_bytes * len(selected) + len(self.model_payload) * uncached

    def _evaluate(self, weights: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.test_set is None:
            return {"accuracy": None, "loss": None}
        loss, accuracy = self._evaluator.evaluate(flatten(weights, self.manifest), *self.test_set)
        return {"accuracy": float(accuracy), "loss": float(loss)}

    def _announce_done(self) -> None:
        last = next((r for r in reversed(self.history) if r.get("status") == "complete"), {})
        final = RoundAnnouncement(
            federation=self.federation, round=self.config.rounds.total, model_hash=self.model_hash,
            model_topic=topics.model_topic(self.federation, self.model_hash), weights_topic="", selection=nobody(),
            deadline=0.0, plan=self.config.training, session=str(last.get("session", "")), state="done",
            issued_at=time.time(), accepted=int(last.get("accepted", 0)), reason=str(last.get("close_reason", "")),
            **self._run_fields(),
        )
        self.retained.broadcast(topics.round_topic(self.federation), to_json(final))
        log.info("federation %s: all %d rounds done", self.federation, self.config.rounds.total)

    def _serve_after_rounds(self) -> None:
        """With [rollout] serve_after_rounds: keep serving rollouts and the registry until stopped."""
        if not self.config.rollout.serve_after_rounds:
            return
        log.info("serving rollouts after the last round until stopped")
        while not self.stop_event.wait(1.0):
            self._notifier("WATCHDOG=1")
            self.retained.repair()

    def _representative(self) -> np.ndarray | None:
        if self.test_set is None:
            return None
        return self.test_set[0][: self.config.evaluation.calibration_examples]

    # --- messages (network thread: classify and enqueue only) --------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        if parsed is None or parsed[0] != self.federation:
            return
        _, kind, client = parsed
        if kind == "updates":
            self.metrics.update_received(len(payload))
            self.inbox.put(Item("update", client, payload))
        elif kind == "reports":
            self.inbox.put(Item("report", client, payload))
        elif kind == "status" and payload:  # small and bounded: parsed here, straight into the fleet
            self._on_json("status", client, payload, DeviceStatus, self.fleet.update)
        elif kind in topics.AGGREGATOR_KINDS:
            self.retained.observe(topic, payload)

    # --- messages (inbox workers) ---------------------------------------------------------------

    def _handle_item(self, item: Item) -> None:
        if item.kind == "update":
            self._on_update(item.client, item.payload)
        else:
            self._on_json("report", item.client, item.payload, DeviceReport, self._on_report)

    def _refuse_busy(self, item: Item) -> None:
        self._refuse(item.kind, "busy", f"{item.kind} from {item.client}: the inbox is full")

    def _on_update(self, client: str, payload: bytes) -> None:
        attempt = self.current
        if attempt is None:
            self._refuse("update", "late", f"update from {client} before any round")
            return
        try:
            attempt.offer(payload, client)
        except Rejected as exc:
            self._refuse("update", exc.reason, f"update from {client}: {exc}", attempt.number)

    def _on_json(self, kind: str, client: str, payload: bytes, cls: type, handle: Any) -> None:
        try:
            message = from_json(cls, payload)
        except ProtocolError as exc:
            self._refuse(kind, exc.reason, f"{kind} from {client}: {exc}")
            return
        if message.client_id != client:
            self._refuse(kind, "sender", f"{client} wrote a {kind} for {message.client_id}")
            return
        handle(message)

    def _on_report(self, report: DeviceReport) -> None:
        problem = check_metrics(report.metrics)
        if problem:
            self._refuse("report", "metrics", f"{report.kind} report from {report.client_id}: {problem}")
            return
        if report.kind == "deployed":  # an inference model installed: the rollout's business, not a round's
            self.rollout.on_report(report)
            return
        attempt = self.current
        if report.run != self._run():
            self._refuse("report", "run", f"{report.kind} report from {report.client_id} for run "
                         f"{report.run[:16]!r}", report.round)
        elif attempt is None or attempt.closed or report.session != attempt.session:
            reason = "future" if attempt is not None and report.round > attempt.number else "late"
            self._refuse("report", reason, f"{report.kind} report from {report.client_id} for round {report.round} "
                         f"session {report.session[:16]!r}, which is not open", report.round)
        elif attempt.report(report):
            self.metrics.report(report.kind)
            log.info("round %d: %s %s: %s", report.round, report.client_id, report.kind, report.reason)

    def _refuse(self, kind: str, reason: str, detail: str, number: int | None = None) -> None:
        attempt = self.current
        if number is None and attempt is not None and not attempt.closed:
            number = attempt.number
        self.ledger.refuse(kind, reason, number, detail)


class _Evaluator:
    """The global model in the same TFLite interpreter the devices use."""

    def __init__(self, train_bytes: bytes, manifest: dict[str, Any]) -> None:
        from fedlite.runtime.trainer import Trainer

        self.trainer = Trainer(train_bytes, manifest)

    def get_weights(self) -> np.ndarray:
        return self.trainer.get_weights()

    def evaluate(self, flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        self.trainer.set_weights(flat)
        return self.trainer.evaluate(x, y)


def _load_test_set(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not path:
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def _broker_settings(config: AggregatorConfig) -> BrokerSettings:
    b = config.broker
    return BrokerSettings(host=b.host, port=b.port, username=b.username, password=b.resolve_password(),
                          tls=b.tls, ca_file=b.ca_file or None)


def _client_id(config: AggregatorConfig) -> str:
    return f"fedlite-aggregator-{config.federation.name}"


def _notifier() -> Any:
    from fedlite.sdnotify import Notifier

    notifier = Notifier()

    def send(message: str) -> None:
        if message == "WATCHDOG=1":
            notifier.ping()
        else:
            notifier.send(message)

    return send
