"""One round on the device, in the agent's child process: model, weights, gated training, the update, personalization.

It reaches the broker, the gates and the round's progress only through its `Host` (the agent that started it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.agent.config import AgentConfig
from fedlite.agent.data import LocalData
from fedlite.agent.downlink import FILE as HELD_FILE
from fedlite.agent.downlink import HeldWeights, WeightsRefused, fetch
from fedlite.agent.gates import describe, failed_gates
from fedlite.agent.host import Host, NotDelivered, Outcome
from fedlite.agent.models import ModelCache
from fedlite.agent.residual import FILE as RESIDUAL_FILE
from fedlite.agent.residual import ResidualKey, ResidualStore
from fedlite.agent.stage import StageFailed
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import Header, encode_update_with_residual
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten
from fedlite.protocol.messages import DeviceReport, RoundAnnouncement, to_json

log = logging.getLogger("fedlite.agent")
GATE_CHECK_SECONDS = 0.1  # while training, the gates and the round are checked this often (and before the first batch)


class RoundAbandoned(Exception):
    """This device cannot finish the round (a gate closed, the round moved on, an input was bad)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class RoundRunner:
    """Round `a` for this device: `run()` returns its outcome (trained, declined or aborted, with the reason)."""

    def __init__(self, config: AgentConfig, a: RoundAnnouncement, data: LocalData, host: Host) -> None:
        self.config = config
        self.a = a
        self.data = data
        self.host = host
        self.client_id = config.device.client_id
        self.federation = config.device.federation
        self.state_dir = Path(config.device.state_dir)
        self.models = ModelCache(self.state_dir / "models", threads=config.agent.threads)
        self.residuals = ResidualStore(self.state_dir / RESIDUAL_FILE)  # error feedback, per model
        self.held = HeldWeights(self.state_dir / HELD_FILE)  # the base of the next downlink deltas
        seed = round_seed(config.agent.seed, self.client_id, a.round)
        self.rng = np.random.default_rng(seed)
        # personalization's own shuffles: turning it on leaves the rounds' shuffles as they were
        self.personal_rng = np.random.default_rng(None if seed is None else [*seed, 1])
        self.received = 0  # payload bytes received for this round (model, weights, deltas, secure stages)
        self.fetched = False  # whether the held weights were read (and perhaps replaced) this round

    def run(self) -> Outcome:
        try:
            self._take_part()
        except StageFailed as exc:
            return self._outcome("aborted", f"secure aggregation: {exc}")
        except RoundAbandoned as exc:
            return self._outcome(exc.kind, exc.reason)
        return self._outcome("trained")

    def _outcome(self, kind: str, reason: str = "") -> Outcome:
        held = self.held.status() if self.fetched else None  # a round declined early leaves them unread
        return Outcome(kind, reason, num_examples=len(self.data.x_train), held=held)

    def _take_part(self) -> None:
        a = self.a
        if a.plan.encoding not in codecs.UPLINK:
            raise RoundAbandoned("declined", f"encoding: {a.plan.encoding!r} is not one this agent can produce")
        self._check_gates("declined")
        trainer, manifest = self._fetch_model()
        global_flat = self._fetch_weights(manifest)
        secure = self._secure_session() if a.secure is not None else None
        if secure is not None:
            secure.share_keys()  # before training: a device that drops out later is unmasked without it
        self.host.status("training")
        delta, examples, metrics, steps = self._train(trainer, global_flat)
        if secure is not None:
            self._check_gates("aborted")  # the network must still be allowed for the upload itself
            sent = secure.send_masked(flatten(delta, manifest), examples, self.rng, self.received)
            self.host.finished()
            log.info("round %d: sent a masked input of %d B after %d steps (%d B in the secure stages)",
                     a.round, sent, steps, secure.sent_bytes + secure.received_bytes)
        else:
            payload = self._encode(delta, examples, metrics)
            self._publish_update(payload)
            self.residuals.commit()  # what the sent update left out, for the next one
            self.host.finished()
            log.info("round %d: sent update of %d B after %d steps", a.round, len(payload), steps)
        self._personalize(trainer, global_flat)

    def _personalize(self, trainer: Any, global_flat: np.ndarray) -> None:
        """With [personalization]: fine-tune a copy of this round's global model, keep it, report both accuracies."""
        settings, a = self.config.personalization, self.a
        if not settings.enabled:
            return
        from fedlite.agent.personalize import keep, personalize

        checked = [time.monotonic()]

        def gates_open() -> bool:  # read at most every GATE_CHECK_SECONDS, like training
            if time.monotonic() - checked[0] < GATE_CHECK_SECONDS:
                return True
            checked[0] = time.monotonic()
            return not self.host.closed(attempt=False) and not failed_gates(self.host.reading(), self.config.gates)

        done = personalize(trainer, global_flat, self.data, settings, a.plan.batch_size, a.plan.learning_rate,
                           self.personal_rng, gates_open, (a.run, a.round, a.model_hash))
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
            self.host.publish(topics.report_topic(self.federation, self.client_id), to_json(report), timeout=10)
        except NotDelivered as err:
            log.warning("could not report the personalization of round %d: %s", a.round, err)

    def _secure_session(self) -> Any:
        """The device's side of a secure round (its X25519/ChaCha20 crypto is imported for secure rounds only)."""
        from fedlite.agent.secure import SecureSession

        a = self.a
        topic = topics.relay_topic(self.federation, self.client_id)
        assert a.secure is not None
        until = a.deadline + a.secure.stage_seconds  # the unmask stage follows the masked inputs' deadline

        def receive() -> bytes | None:
            while True:
                try:
                    return self.host.wait(topic, until)
                except ProtocolError:
                    self.host.bad("relay")

        def send(payload: bytes) -> None:
            try:
                self.host.publish(topics.secagg_topic(self.federation, self.client_id), payload)
            except NotDelivered as exc:
                raise StageFailed(f"not delivered: {exc}") from None

        try:
            return SecureSession(a, self.client_id, send, receive, self.host.bad)
        except StageFailed as exc:
            raise RoundAbandoned("declined", f"secure aggregation: {exc}") from None

    def _check_gates(self, kind: str) -> None:
        failures = failed_gates(self.host.reading(), self.config.gates)
        if failures:
            raise RoundAbandoned(kind, describe(failures))

    def _fetch_model(self) -> tuple[Any, dict[str, Any]]:
        a = self.a
        if not self.models.has(a.model_hash):
            self.host.subscribe(a.model_topic)
            try:
                payload = self.host.wait(a.model_topic, a.deadline)
            except ProtocolError as exc:
                self.host.bad(exc.reason)
                raise RoundAbandoned("aborted", f"model message refused: {exc}") from None
            finally:
                self.host.unsubscribe(a.model_topic)
            if payload is None:
                raise RoundAbandoned("aborted", f"model {a.model_hash[:12]} did not arrive before the round closed")
            self.received += len(payload)
            try:
                self.models.store(a.model_hash, payload)
            except ProtocolError as exc:
                self.host.bad(exc.reason)
                raise RoundAbandoned("aborted", f"model message refused: {exc}") from None
        trainer, manifest = self.models.trainer(a.model_hash)
        mismatch = data_mismatch(self.data, manifest)
        if mismatch:
            raise RoundAbandoned("declined", f"data_mismatch: {mismatch}")
        return trainer, manifest

    def _fetch_weights(self, manifest: dict[str, Any]) -> np.ndarray:
        a = self.a
        self.fetched = True
        try:
            fetched = fetch(a, manifest, self.held, self._receive, self.host.bad)
        except WeightsRefused as exc:
            raise RoundAbandoned("aborted", str(exc)) from None
        self.received += fetched.bytes
        if fetched.how != "full":
            log.info("round %d: weights from %s (%d B received)", a.round, fetched.how, fetched.bytes)
        return fetched.flat

    def _receive(self, names: list[str], wait: float) -> list[bytes | None]:
        """The verified payloads of retained topics, each awaited until the round closes or `wait` seconds pass."""
        for name in names:
            self.host.subscribe(name)
        deadline = min(self.a.deadline, time.time() + wait)
        try:
            return [self.host.wait(name, deadline) for name in names]
        finally:
            for name in names:
                self.host.unsubscribe(name)

    def _train(self, trainer: Any, global_flat: np.ndarray) -> tuple[np.ndarray, int, dict[str, float], int]:
        """(the local delta, the examples it trained on, its metrics, the steps taken)."""
        from fedlite.runtime.trainer import local_update

        a, data = self.a, self.data
        plan = a.plan
        x, y = data.x_train, data.y_train
        limit = min(v for v in (plan.max_examples, self.config.agent.max_examples, len(x)) if v > 0)
        if limit < len(x):
            pick = self.rng.choice(len(x), size=limit, replace=False)
            x, y = x[pick], y[pick]
        trainer.set_weights(global_flat)
        before = trainer.evaluate(data.x_holdout, data.y_holdout) if len(data.x_holdout) else None
        closed: list[str] = []
        last, reading, checked = [time.monotonic()], [self.host.reading()], [0.0]

        def should_continue() -> bool:  # between batches; the gates are read at most every GATE_CHECK_SECONDS
            now = time.monotonic()
            simulate_hardware(reading[0], now - last[0])
            last[0] = time.monotonic()
            if last[0] - checked[0] < GATE_CHECK_SECONDS:
                return True
            checked[0] = last[0]
            reading[0] = self.host.reading()
            failures = failed_gates(reading[0], self.config.gates)
            if failures:
                closed.append(describe(failures))
            elif why := self.host.closed():
                closed.append(why)
            elif time.time() > a.deadline:
                closed.append("the round closed before training finished")
            return not closed

        epochs = min(plan.epochs, self.config.agent.max_epochs)
        delta, result = local_update(trainer, global_flat, x, y, epochs, plan.batch_size, plan.learning_rate,
                                     plan.proximal_mu, self.rng, should_continue)
        if result.aborted:
            raise RoundAbandoned("aborted", f"{closed[0] if closed else result.reason} (after {result.steps} steps)")
        metrics = {"train_loss": float(result.loss), "steps": float(result.steps)}
        if before is not None:
            after = trainer.evaluate(data.x_holdout, data.y_holdout)
            metrics |= {"eval_loss_before": before[0], "eval_accuracy_before": before[1],
                        "eval_loss_after": after[0], "eval_accuracy_after": after[1]}
        return delta, int(len(x)), {k: float(v) for k, v in metrics.items() if np.isfinite(v)}, result.steps

    def _encode(self, delta: np.ndarray, examples: int, metrics: dict[str, float]) -> bytes:
        """The update frame in the plan's codec, with error feedback when the codec keeps a residual."""
        a = self.a
        plan = a.plan
        header = Header(kind="update", federation=self.federation, round=a.round, model_hash=a.model_hash,
                        client_id=self.client_id, num_examples=examples, run=a.run, metrics=metrics,
                        extra={"bytes_down": self.received})
        key = ResidualKey(a.run, a.model_hash, plan.encoding, a.round)
        residual = self.residuals.load(key) if codecs.get(plan.encoding).residual else None
        payload, left = encode_update_with_residual(delta, header, encoding=plan.encoding, residual=residual,
                                                    stochastic=plan.stochastic_rounding, rng=self.rng)
        self.residuals.stage(key, left)
        return payload

    def _publish_update(self, payload: bytes) -> None:
        self._check_gates("aborted")  # the network must still be allowed for the upload itself
        try:
            self.host.publish(topics.update_topic(self.federation, self.client_id), payload)
        except NotDelivered as exc:
            raise RoundAbandoned("aborted", f"update not delivered: {exc}") from None


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


def round_seed(seed: int, client_id: str, round_number: int) -> list[int] | None:
    """The round's shuffles: `[agent] seed` as given, 0 a seed of the client id (each device its own, the same in
    every run), -1 none; each round its own stream of it (a round's process starts afresh)."""
    if seed == -1:
        return None
    base = seed or int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "big")
    return [base, round_number]
