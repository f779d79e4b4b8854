"""The device agent's main loop: status, round participation, gated local training, encoded updates."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlite import __version__
from fedlite.agent import watermark
from fedlite.agent.config import AgentConfig
from fedlite.agent.data import LocalData, load_local_data
from fedlite.agent.deploy import Channel, Deployer
from fedlite.agent.downlink import FILE as HELD_FILE
from fedlite.agent.downlink import HeldWeights, WeightsRefused, fetch
from fedlite.agent.gates import describe, failed_gates
from fedlite.agent.models import ModelCache
from fedlite.agent.residual import FILE as RESIDUAL_FILE
from fedlite.agent.residual import ResidualKey, ResidualStore
from fedlite.agent.stage import StageFailed
from fedlite.agent.state import FileState, PsutilState, StateProvider
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import Header, encode_update_with_residual
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten
from fedlite.protocol.messages import DeviceReport, DeviceStatus, RoundAnnouncement, from_json, to_json
from fedlite.protocol.selection import is_selected
from fedlite.protocol.signing import SignatureError, Verifier
from fedlite.protocol.transport import BrokerSettings, Link, PayloadTooLarge, PublishRefused
from fedlite.sdnotify import Notifier

log = logging.getLogger("fedlite.agent")
GATE_CHECK_SECONDS = 0.1  # while training, the gates and the round are checked this often (and before the first batch)


class RoundAbandoned(Exception):
    """This device cannot finish the round (a gate closed, the round moved on, an input was bad)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class Counters:
    rounds_trained: int = 0
    rounds_declined: int = 0
    rounds_aborted: int = 0
    bad_messages: int = 0
    refused_signatures: int = 0
    refused_announcements: dict[str, int] = field(default_factory=dict)  # by reason: replayed, stale_run, ...


class Mailbox:
    """Latest payload per topic, filled by the network thread, awaited by the agent's thread."""

    def __init__(self) -> None:
        self._items: dict[str, bytes] = {}
        self._cond = threading.Condition()

    def put(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self._items[topic] = payload
            self._cond.notify_all()

    def wait(self, topic: str, deadline: float, stop: threading.Event,
             give_up: Callable[[], bool] = lambda: False, tick: Callable[[], None] = lambda: None) -> bytes | None:
        """The payload once it arrives; None at the deadline, on `stop`, or once `give_up()` holds.

        `tick` runs at least every 0.5 s while waiting (the agent feeds its systemd watchdog there).
        """
        with self._cond:
            while topic not in self._items:
                tick()
                remaining = deadline - time.time()
                if remaining <= 0 or stop.is_set() or give_up():
                    return None
                self._cond.wait(min(remaining, 0.5))
            return self._items.pop(topic)


class Agent:
    def __init__(self, config: AgentConfig, state: StateProvider | None = None, *, data: LocalData | None = None,
                 models: ModelCache | None = None) -> None:
        """`data` and `models` may be given to run many virtual agents in one process (the simulator)."""
        self.config = config
        self.client_id = config.device.client_id
        self.federation = config.device.federation
        self.state = state or _state_provider(config)
        self.data: LocalData = data if data is not None else load_local_data(config.data)
        self.state_dir = Path(config.device.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.models = models or ModelCache(self.state_dir / "models", threads=config.agent.threads)
        self._release_after_round = models is None  # virtual agents share one cache: theirs stays loaded
        self.counters = Counters()
        self.notifier = Notifier()
        self.stop_event = threading.Event()
        self._announcements: queue.Queue[RoundAnnouncement] = queue.Queue()
        self._mailbox = Mailbox()
        self._progress_path = self.state_dir / "progress.json"
        self._mark = watermark.load(self._progress_path)
        self._mark_lock = threading.Lock()  # the network thread advances the mark, the agent's thread finishes it
        self.residuals = ResidualStore(self.state_dir / RESIDUAL_FILE)  # error feedback, per model
        self.held = HeldWeights(self.state_dir / HELD_FILE)  # the base of the next downlink deltas
        self._received = 0  # payload bytes received for the round being trained (model, weights, deltas)
        seed = _shuffle_seed(config.agent.seed, self.client_id)
        self._rng = np.random.default_rng(seed)
        # personalization's own shuffles: turning it on leaves the rounds' shuffles as they were
        self._personal_rng = np.random.default_rng(None if seed is None else [seed, 1])
        self._verifier = Verifier.from_files(config.trust.aggregator_keys) if config.trust.aggregator_keys else None
        self.deployer = Deployer(config.deploy, self.state_dir, self.client_id, self.federation)
        self.link = Link(
            _broker_settings(config), self.client_id, self._on_message,
            will=(topics.status_topic(self.federation, self.client_id), to_json(self._status("offline", {}))),
        )

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        log.info("agent %s for federation %s: %d training and %d held-out examples, runtime %s",
                 self.client_id, self.federation, len(self.data.x_train), len(self.data.x_holdout),
                 self.models.runtime)
        self.link.subscribe(topics.round_topic(self.federation))
        self.link.subscribe(topics.relay_topic(self.federation, self.client_id))  # secure rounds' stages
        if self.config.deploy.enabled:
            self.link.subscribe(topics.deploy_topic(self.federation))
        deploy = Channel(self.link, self._mailbox, self._verified, self.data.x_holdout, self.data.y_holdout,
                         self.stop_event)
        self.link.connect()
        self.notifier.ready(f"connected as {self.client_id}")
        next_status = 0.0
        while not self.stop_event.is_set():
            self.notifier.ping()
            if time.monotonic() >= next_status:
                self._publish_status()
                next_status = time.monotonic() + self.config.agent.status_interval_seconds
            if self.deployer.apply_pending(deploy):
                next_status = 0.0  # the new deployed_model goes out with the next status
                continue
            try:
                announcement = self._announcements.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._should_take_part(announcement):
                self._take_part(announcement)
                if self._release_after_round:
                    self.models.release()  # an idle agent holds no interpreter between rounds
                next_status = 0.0
        self.notifier.stopping()
        self._publish_offline()
        self.link.close()

    def _publish_offline(self) -> None:
        """A clean stop says so: the broker sends the last will only when the connection breaks."""
        try:
            self.link.publish(topics.status_topic(self.federation, self.client_id),
                              to_json(self._status("offline", {})), retain=True, timeout=5)
        except (PayloadTooLarge, PublishRefused, TimeoutError) as exc:
            log.warning("could not publish the offline status: %s", exc)

    def stop(self) -> None:
        self.stop_event.set()

    # --- messages (network thread) ---------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # the aggregator cleared a retained topic (e.g. a closed round's weights): not a message
        if topic == topics.round_topic(self.federation):
            try:
                announcement = from_json(RoundAnnouncement, self._verified(topic, payload))
            except ProtocolError as exc:
                self.counters.bad_messages += 1
                log.warning("ignored a malformed round announcement: %s", exc)
                return
            with self._mark_lock:
                self._follow(announcement)
        elif topic == topics.deploy_topic(self.federation):
            self.deployer.offer(payload)  # verified and carried out on the agent's thread
        else:
            self._mailbox.put(topic, payload)

    def _verified(self, topic: str, payload: bytes) -> bytes:
        """The payload of a broadcast signed by a pinned aggregator key; raises SignatureError otherwise."""
        if self._verifier is None:
            return payload  # trust.allow_unsigned
        try:
            return self._verifier.verify(topic, payload)
        except SignatureError:
            self.counters.refused_signatures += 1
            raise

    # --- one round ---------------------------------------------------------------------------

    def _follow(self, announcement: RoundAnnouncement) -> None:
        """Judge a verified announcement against the mark; follow it (advance, persist, queue) or count a refusal."""
        refusal = watermark.judge(self._mark, announcement)
        if refusal is not None:
            self._refuse_announcement(announcement, refusal)
            return
        self._mark = watermark.advance(self._mark, announcement)
        watermark.save(self._progress_path, self._mark)
        self._announcements.put(announcement)

    def _refuse_announcement(self, a: RoundAnnouncement, reason: str) -> None:
        counts = self.counters.refused_announcements
        counts[reason] = counts.get(reason, 0) + 1
        if counts[reason] == 1 or reason != "replayed":
            log.warning("refused a round announcement (%s): run %s epoch %d round %d session %s; following run %s "
                        "epoch %d round %d", reason, a.run[:8], a.epoch, a.round, a.session, self._mark.run[:8],
                        self._mark.epoch, self._mark.round)

    def _should_take_part(self, a: RoundAnnouncement) -> bool:
        return (
            a.federation == self.federation and a.state == "open" and is_selected(a.selection, self.client_id)
            and a.session != self._mark.done_session and not watermark.superseded(self._mark, a)
            and time.time() < a.deadline
        )

    def _take_part(self, a: RoundAnnouncement) -> None:
        try:
            if a.plan.encoding not in codecs.UPLINK:
                raise RoundAbandoned("declined", f"encoding: {a.plan.encoding!r} is not one this agent can produce")
            self._check_gates("declined")
            self._received = 0
            trainer, manifest = self._fetch_model(a)
            global_flat = self._fetch_weights(a, manifest)
            secure = self._secure_session(a) if a.secure is not None else None
            if secure is not None:
                secure.share_keys()  # before training: a device that drops out later is unmasked without it
            self._publish_status("training")
            with self.models.lock:  # one interpreter per model; virtual agents in one process take turns
                delta, examples, metrics, steps = self._train(a, trainer, global_flat)
            if secure is not None:
                self._check_gates("aborted")  # the network must still be allowed for the upload itself
                sent = secure.send_masked(flatten(delta, manifest), examples, self._rng, self._received)
                self._finish(a)
                log.info("round %d: sent a masked input of %d B after %d steps (%d B in the secure stages)",
                         a.round, sent, steps, secure.sent_bytes + secure.received_bytes)
                self._personalize(a, trainer, global_flat)
                return
            payload = self._encode(a, delta, examples, metrics)
            self._publish_update(a, payload)
            self.residuals.commit()  # what the sent update left out, for the next one
            self._finish(a)
            log.info("round %d: sent update of %d B after %d steps", a.round, len(payload), steps)
            self._personalize(a, trainer, global_flat)
        except StageFailed as exc:
            self._abandon(a, RoundAbandoned("aborted", f"secure aggregation: {exc}"))
        except RoundAbandoned as exc:
            self._abandon(a, exc)

    def _personalize(self, a: RoundAnnouncement, trainer: Any, global_flat: np.ndarray) -> None:
        """With [personalization]: fine-tune a copy of this round's global model, keep it, report both accuracies."""
        settings = self.config.personalization
        if not settings.enabled:
            return
        from fedlite.agent.personalize import keep, personalize

        checked = [time.monotonic()]

        def gates_open() -> bool:  # read at most every GATE_CHECK_SECONDS, like training
            if time.monotonic() - checked[0] < GATE_CHECK_SECONDS:
                return not self.stop_event.is_set()
            checked[0] = time.monotonic()
            self.notifier.ping()
            return not self.stop_event.is_set() and not failed_gates(self.state.read(), self.config.gates)

        with self.models.lock:
            done = personalize(trainer, global_flat, self.data, settings, a.plan.batch_size, a.plan.learning_rate,
                               self._personal_rng, gates_open, (a.run, a.round, a.model_hash))
        if done is None:
            return
        comparison, weights = done
        kept = keep(self.state_dir, comparison, weights)  # not kept: logged, what was served before stays
        log.info("round %d: personalized accuracy %.3f vs global %.3f on the held-out split%s", a.round,
                 comparison.personalized_accuracy, comparison.global_accuracy,
                 f": serving the {comparison.serving} model" if kept else "")
        report = DeviceReport(client_id=self.client_id, round=a.round, kind="evaluation", reason="personalization",
                              metrics=comparison.metrics(), sent_at=time.time(), run=a.run, session=a.session)
        try:
            self.link.publish(topics.report_topic(self.federation, self.client_id), to_json(report), timeout=10)
        except (PublishRefused, TimeoutError) as err:
            log.warning("could not report the personalization of round %d: %s", a.round, err)

    def _finish(self, a: RoundAnnouncement) -> None:
        with self._mark_lock:
            self._mark = watermark.finished(self._mark, a.session)
            watermark.save(self._progress_path, self._mark)
        self.counters.rounds_trained += 1

    def _secure_session(self, a: RoundAnnouncement) -> Any:
        """The device's side of a secure round (its X25519/ChaCha20 crypto is imported for secure rounds only)."""
        from fedlite.agent.secure import SecureSession

        topic = topics.relay_topic(self.federation, self.client_id)
        assert a.secure is not None
        until = a.deadline + a.secure.stage_seconds  # the unmask stage follows the masked inputs' deadline

        def receive() -> bytes | None:
            while (payload := self._mailbox.wait(topic, until, self.stop_event, self._closed(a),
                                                 self.notifier.ping)) is not None:
                try:
                    return self._verified(topic, payload)
                except ProtocolError:
                    self.counters.bad_messages += 1
            return None

        def send(payload: bytes) -> None:
            try:
                self.link.publish(topics.secagg_topic(self.federation, self.client_id), payload,
                                  tick=self.notifier.ping)
            except (PayloadTooLarge, PublishRefused, TimeoutError) as exc:
                raise StageFailed(f"not delivered: {exc}") from None

        try:
            return SecureSession(a, self.client_id, send, receive, self._bad)
        except StageFailed as exc:
            raise RoundAbandoned("declined", f"secure aggregation: {exc}") from None

    def _check_gates(self, kind: str) -> None:
        failures = failed_gates(self.state.read(), self.config.gates)
        if failures:
            raise RoundAbandoned(kind, describe(failures))

    def _fetch_model(self, a: RoundAnnouncement) -> tuple[Any, dict[str, Any]]:
        if not self.models.has(a.model_hash):
            self.link.subscribe(a.model_topic)
            payload = self._mailbox.wait(a.model_topic, a.deadline, self.stop_event, self._closed(a),
                                         self.notifier.ping)
            self.link.unsubscribe(a.model_topic)
            if payload is None:
                raise RoundAbandoned("aborted", f"model {a.model_hash[:12]} did not arrive before the round closed")
            self._received += len(payload)
            try:
                self.models.store(a.model_hash, self._verified(a.model_topic, payload))
            except ProtocolError as exc:
                self.counters.bad_messages += 1
                raise RoundAbandoned("aborted", f"model message refused: {exc}") from None
        trainer, manifest = self.models.trainer(a.model_hash)
        mismatch = data_mismatch(self.data, manifest)
        if mismatch:
            raise RoundAbandoned("declined", f"data_mismatch: {mismatch}")
        return trainer, manifest

    def _fetch_weights(self, a: RoundAnnouncement, manifest: dict[str, Any]) -> np.ndarray:
        try:
            fetched = fetch(a, manifest, self.held, lambda names, wait: self._receive(a, names, wait), self._bad)
        except WeightsRefused as exc:
            raise RoundAbandoned("aborted", str(exc)) from None
        self._received += fetched.bytes
        if fetched.how != "full":
            log.info("round %d: weights from %s (%d B received)", a.round, fetched.how, fetched.bytes)
        return fetched.flat

    def _receive(self, a: RoundAnnouncement, names: list[str], wait: float) -> list[bytes | None]:
        """The verified payloads of retained topics, each awaited until the round closes or `wait` seconds pass."""
        for name in names:
            self.link.subscribe(name)
        deadline = min(a.deadline, time.time() + wait)
        try:
            payloads = [self._mailbox.wait(name, deadline, self.stop_event, self._closed(a), self.notifier.ping)
                        for name in names]
        finally:
            for name in names:
                self.link.unsubscribe(name)
        return [None if p is None else self._verified(name, p) for name, p in zip(names, payloads, strict=True)]

    def _bad(self, reason: str) -> None:
        self.counters.bad_messages += 1

    def _train(self, a: RoundAnnouncement, trainer: Any,
               global_flat: np.ndarray) -> tuple[np.ndarray, int, dict[str, float], int]:
        """(the local delta, the examples it trained on, its metrics, the steps taken)."""
        from fedlite.runtime.trainer import local_update

        plan, data = a.plan, self.data
        x, y = data.x_train, data.y_train
        limit = min(v for v in (plan.max_examples, self.config.agent.max_examples, len(x)) if v > 0)
        if limit < len(x):
            pick = self._rng.choice(len(x), size=limit, replace=False)
            x, y = x[pick], y[pick]
        trainer.set_weights(global_flat)
        before = trainer.evaluate(data.x_holdout, data.y_holdout) if len(data.x_holdout) else None
        closed: list[str] = []
        last, reading, checked = [time.monotonic()], [self.state.read()], [0.0]

        def should_continue() -> bool:  # between batches; the gates are read at most every GATE_CHECK_SECONDS
            now = time.monotonic()
            simulate_hardware(reading[0], now - last[0])
            last[0] = time.monotonic()
            if last[0] - checked[0] < GATE_CHECK_SECONDS:
                return True
            checked[0] = last[0]
            self.notifier.ping()
            reading[0] = self.state.read()
            failures = failed_gates(reading[0], self.config.gates)
            if failures:
                closed.append(describe(failures))
            elif self.stop_event.is_set():
                closed.append("agent stopping")
            elif watermark.superseded(self._mark, a) or time.time() > a.deadline:
                closed.append("the round closed before training finished")
            return not closed

        epochs = min(plan.epochs, self.config.agent.max_epochs)
        delta, result = local_update(trainer, global_flat, x, y, epochs, plan.batch_size, plan.learning_rate,
                                     plan.proximal_mu, self._rng, should_continue)
        if result.aborted:
            raise RoundAbandoned("aborted", f"{closed[0] if closed else result.reason} (after {result.steps} steps)")
        metrics = {"train_loss": float(result.loss), "steps": float(result.steps)}
        if before is not None:
            after = trainer.evaluate(data.x_holdout, data.y_holdout)
            metrics |= {"eval_loss_before": before[0], "eval_accuracy_before": before[1],
                        "eval_loss_after": after[0], "eval_accuracy_after": after[1]}
        return delta, int(len(x)), {k: float(v) for k, v in metrics.items() if np.isfinite(v)}, result.steps

    def _encode(self, a: RoundAnnouncement, delta: np.ndarray, examples: int, metrics: dict[str, float]) -> bytes:
        """The update frame in the plan's codec, with error feedback when the codec keeps a residual."""
        plan = a.plan
        header = Header(kind="update", federation=self.federation, round=a.round, model_hash=a.model_hash,
                        client_id=self.client_id, num_examples=examples, run=a.run, metrics=metrics,
                        extra={"bytes_down": self._received})
        key = ResidualKey(a.run, a.model_hash, plan.encoding, a.round)
        residual = self.residuals.load(key) if codecs.get(plan.encoding).residual else None
        payload, left = encode_update_with_residual(delta, header, encoding=plan.encoding, residual=residual,
                                                    stochastic=plan.stochastic_rounding, rng=self._rng)
        self.residuals.stage(key, left)
        return payload

    def _publish_update(self, a: RoundAnnouncement, payload: bytes) -> None:
        self._check_gates("aborted")  # the network must still be allowed for the upload itself
        topic = topics.update_topic(self.federation, self.client_id)
        try:
            self.link.publish(topic, payload, tick=self.notifier.ping)
        except (PayloadTooLarge, PublishRefused, TimeoutError) as exc:
            raise RoundAbandoned("aborted", f"update not delivered: {exc}") from None

    def _closed(self, a: RoundAnnouncement) -> Callable[[], bool]:
        """Whether the attempt `a` announced is over for this device (closed, retried, a later round or run)."""
        return lambda: watermark.superseded(self._mark, a)

    def _abandon(self, a: RoundAnnouncement, exc: RoundAbandoned) -> None:
        if exc.kind == "declined":
            self.counters.rounds_declined += 1
        else:
            self.counters.rounds_aborted += 1
        log.warning("round %d %s: %s", a.round, exc.kind, exc.reason)
        if not self.state.read().online or watermark.superseded(self._mark, a):
            return  # a device off the network says nothing; nor does one whose round has closed
        report = DeviceReport(client_id=self.client_id, round=a.round, kind=exc.kind, reason=exc.reason,
                              sent_at=time.time(), run=a.run, session=a.session)
        try:
            self.link.publish(topics.report_topic(self.federation, self.client_id), to_json(report), timeout=10)
        except (PublishRefused, TimeoutError) as err:
            log.warning("could not report the %s round %d: %s", exc.kind, a.round, err)

    # --- status and progress -----------------------------------------------------------------

    def _status(self, state: str, failures: dict[str, str]) -> DeviceStatus:
        weights_run, weights_round = self.held.status()
        return DeviceStatus(
            client_id=self.client_id, state=state, eligible=state != "offline" and not failures,
            failed_gates=failures, num_examples=int(len(self.data.x_train)), runtime=self.models.runtime,
            agent_version=__version__, cached_models=self.models.hashes(), updated_at=time.time(),
            deployed_model=self.deployer.deployed_model, encodings=list(codecs.UPLINK),
            weights_run=weights_run, weights_round=weights_round,
        )

    def _publish_status(self, state: str = "online") -> None:
        reading = self.state.read()
        if not reading.online:
            return
        failures = failed_gates(reading, self.config.gates)
        try:
            self.link.publish_nowait(topics.status_topic(self.federation, self.client_id),
                                     to_json(self._status(state, failures)), retain=True)
        except PayloadTooLarge as exc:
            log.error("status not sent: %s", exc)
        self.notifier.status(f"{state}; " + ("eligible" if not failures else describe(failures)))


def simulate_hardware(reading: Any, took: float) -> None:
    """A simulated device's speed (its state's `batch_seconds` and `slowdown`): wait out the rest of the batch."""
    target = max(took, reading.batch_seconds) * max(1.0, reading.slowdown)
    if target > took:
        time.sleep(min(10.0, target - took))


def data_mismatch(data: LocalData, manifest: dict[str, Any]) -> str | None:
    """Why the device's data cannot train this model (None if it can): feature shape or label range."""
    expected = tuple(int(d) for d in manifest["input"]["shape"]) if isinstance(manifest.get("input"), dict) else None
    if expected is None:
        return None
    for name, x in (("training", data.x_train), ("held-out", data.x_holdout)):
        if len(x) and tuple(x.shape[1:]) != expected:
            return f"{name} examples have shape {list(x.shape[1:])}, the model expects {list(expected)}"
    classes = int(manifest.get("classes", 0))
    labels = [y for y in (data.y_train, data.y_holdout) if len(y)]
    if classes and labels and (min(int(y.min()) for y in labels) < 0 or max(int(y.max()) for y in labels) >= classes):
        return f"labels fall outside 0..{classes - 1}"
    return None


def _shuffle_seed(seed: int, client_id: str) -> int | None:
    """`[agent] seed`: as given; 0, a seed of the client id (each device its own, the same in every run); -1, none."""
    if seed == -1:
        return None
    return seed or int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "big")


def _state_provider(config: AgentConfig) -> StateProvider:
    if config.state.provider == "file":
        return FileState(config.state.file)
    return PsutilState(window_seconds=config.state.idle_window_seconds)


def _broker_settings(config: AgentConfig) -> BrokerSettings:
    b = config.broker
    return BrokerSettings(
        host=b.host, port=b.port, username=b.username or config.device.client_id,
        password=b.resolve_password(), tls=b.tls, ca_file=b.ca_file or None, cert_file=b.cert_file or None,
        key_file=b.key_file or None, keepalive=b.keepalive, reconnect_min=b.reconnect_min_seconds,
        reconnect_max=b.reconnect_max_seconds,
    )
