"""The device agent: the broker connection, the round announcements it follows, its status; each round, and each
deployment, in a short-lived child process (`agent.supervisor`), so an idle agent holds neither numpy nor a runtime."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedlite import __version__
from fedlite.agent import watermark
from fedlite.agent.config import AgentConfig
from fedlite.agent.dataspec import DataError
from fedlite.agent.deploy import Deployer, DeployError
from fedlite.agent.gates import describe, failed_gates
from fedlite.agent.host import Job, NotDelivered, Outcome
from fedlite.agent.models import cached_models
from fedlite.agent.state import DeviceState, FileState, PsutilState, StateProvider
from fedlite.agent.supervisor import Jobs
from fedlite.protocol import topics
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import DeployTarget, DeviceReport, DeviceStatus, RoundAnnouncement, from_json, to_json
from fedlite.protocol.selection import is_selected
from fedlite.protocol.signing import SignatureError, Verifier
from fedlite.protocol.transport import BrokerSettings, Link, PayloadTooLarge, PublishRefused
from fedlite.runtime.interpreter import runtime_name
from fedlite.sdnotify import Notifier

log = logging.getLogger("fedlite.agent")


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
    def __init__(self, config: AgentConfig, state: StateProvider | None = None, log_level: str = "INFO") -> None:
        """Checks the local data in a child process first: DataError if it does not load."""
        self.config = config
        self.log_level = log_level
        self.client_id = config.device.client_id
        self.federation = config.device.federation
        self.state = state or _state_provider(config)
        self.state_dir = Path(config.device.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = self.state_dir / "models"
        self.counters = Counters()
        self.notifier = Notifier()
        self.stop_event = threading.Event()
        self._announcements: queue.Queue[RoundAnnouncement] = queue.Queue()
        self._mailbox = Mailbox()
        self._progress_path = self.state_dir / "progress.json"
        self._mark = watermark.load(self._progress_path)
        self._mark_lock = threading.Lock()  # the network thread advances the mark, the agent's thread finishes it
        self._verifier = Verifier.from_files(config.trust.aggregator_keys) if config.trust.aggregator_keys else None
        self.deployer = Deployer(config.deploy, self.state_dir, self.client_id, self.federation)
        self.jobs = Jobs(config.agent.keep_process_seconds)
        # what the status reports about the data, the held weights and the codecs, as the last job read them
        self._examples, self._held, self._encodings = 0, ("", 0), ()
        probed = self._run(Job("probe", config, log_level))
        if probed.kind != "probed":
            raise DataError(probed.reason)
        self._encodings = probed.encodings
        self.link = Link(
            _broker_settings(config), self.client_id, self._on_message,
            will=(topics.status_topic(self.federation, self.client_id), to_json(self._status("offline", {}))),
        )

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> None:
        log.info("agent %s for federation %s: %d training examples, runtime %s", self.client_id, self.federation,
                 self._examples, runtime_name())
        self.link.subscribe(topics.round_topic(self.federation))
        self.link.subscribe(topics.relay_topic(self.federation, self.client_id))  # secure rounds' stages
        if self.config.deploy.enabled:
            self.link.subscribe(topics.deploy_topic(self.federation))
        self.link.connect()
        self.notifier.ready(f"connected as {self.client_id}")
        next_status = 0.0
        while not self.stop_event.is_set():
            self.notifier.ping()
            self.jobs.expire()
            if time.monotonic() >= next_status:
                self._publish_status()
                next_status = time.monotonic() + self.config.agent.status_interval_seconds
            if self.deployer.apply_pending(self._verified, self._install):
                next_status = 0.0  # the new deployed_model goes out with the next status
                continue
            try:
                announcement = self._announcements.get(timeout=0.2)
            except queue.Empty:
                continue
            if self._should_take_part(announcement):
                self._take_part(announcement)
                next_status = 0.0
        self.notifier.stopping()
        self.jobs.close()
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
        """The round in a child process (`agent.round`); a declined or aborted one reported to the aggregator."""
        outcome = self._run(Job("round", self.config, self.log_level, announcement=a), a)
        if outcome.kind in ("trained", "declined", "aborted"):
            if outcome.kind != "trained":
                self._abandon(a, outcome.kind, outcome.reason)
            return
        if self._mark.done_session == a.session:  # the update went out; what failed came after it
            log.warning("round %d: the round's process failed after its update was sent: %s", a.round,
                        outcome.reason)
            return
        self._abandon(a, "aborted", f"the round's process failed: {outcome.reason}")

    def _install(self, target: DeployTarget, deployment_id: str) -> None:
        """A deployment's fetch, evaluation and installation, in a child process (`agent.install`)."""
        outcome = self._run(Job("deploy", self.config, self.log_level, target=target, deployment_id=deployment_id))
        if outcome.kind != "deployed":
            raise DeployError(outcome.reason)

    def _run(self, job: Job, attempt: RoundAnnouncement | None = None) -> Outcome:
        outcome = self.jobs.run(job, ServedHost(self, attempt), self.notifier.ping)
        if outcome.num_examples >= 0:
            self._examples = outcome.num_examples
        if outcome.held is not None:
            self._held = outcome.held
        return outcome

    def _finish(self, a: RoundAnnouncement) -> None:
        with self._mark_lock:
            self._mark = watermark.finished(self._mark, a.session)
            watermark.save(self._progress_path, self._mark)
        self.counters.rounds_trained += 1

    def _closed(self, a: RoundAnnouncement) -> Callable[[], bool]:
        """Whether the attempt `a` announced is over for this device (closed, retried, a later round or run)."""
        return lambda: watermark.superseded(self._mark, a)

    def _abandon(self, a: RoundAnnouncement, kind: str, reason: str) -> None:
        if kind == "declined":
            self.counters.rounds_declined += 1
        else:
            self.counters.rounds_aborted += 1
        log.warning("round %d %s: %s", a.round, kind, reason)
        if not self.state.read().online or watermark.superseded(self._mark, a):
            return  # a device off the network says nothing; nor does one whose round has closed
        report = DeviceReport(client_id=self.client_id, round=a.round, kind=kind, reason=reason,
                              sent_at=time.time(), run=a.run, session=a.session)
        try:
            self.link.publish(topics.report_topic(self.federation, self.client_id), to_json(report), timeout=10)
        except (PublishRefused, TimeoutError) as err:
            log.warning("could not report the %s round %d: %s", kind, a.round, err)

    # --- status and progress -----------------------------------------------------------------

    def _status(self, state: str, failures: dict[str, str]) -> DeviceStatus:
        weights_run, weights_round = self._held
        return DeviceStatus(
            client_id=self.client_id, state=state, eligible=state != "offline" and not failures,
            failed_gates=failures, num_examples=self._examples, runtime=runtime_name(),
            agent_version=__version__, cached_models=cached_models(self.models_dir), updated_at=time.time(),
            deployed_model=self.deployer.deployed_model, encodings=list(self._encodings),
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


class ServedHost:
    """The agent as a job's `Host`: its link, mailbox, pinned keys, gates and progress mark; `attempt`, the round
    the job takes part in (None: a deployment, the probe)."""

    def __init__(self, agent: Agent, attempt: RoundAnnouncement | None) -> None:
        self.agent = agent
        self.attempt = attempt

    def subscribe(self, topic: str) -> None:
        self.agent.link.subscribe(topic)

    def unsubscribe(self, topic: str) -> None:
        self.agent.link.unsubscribe(topic)

    def wait(self, topic: str, until: float, verify: bool = True) -> bytes | None:
        agent = self.agent
        give_up = agent._closed(self.attempt) if self.attempt is not None else (lambda: False)
        payload = agent._mailbox.wait(topic, until, agent.stop_event, give_up, agent.notifier.ping)
        return agent._verified(topic, payload) if payload is not None and verify else payload

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = 30.0) -> None:
        try:
            self.agent.link.publish(topic, payload, retain=retain, timeout=timeout, tick=self.agent.notifier.ping)
        except (PayloadTooLarge, PublishRefused, TimeoutError) as exc:
            raise NotDelivered(str(exc)) from None

    def reading(self) -> DeviceState:
        return self.agent.state.read()

    def closed(self, attempt: bool = True) -> str:
        if self.agent.stop_event.is_set():
            return "agent stopping"
        if attempt and self.attempt is not None and self.agent._closed(self.attempt)():
            return "the round closed before training finished"
        return ""

    def finished(self) -> None:
        if self.attempt is not None:
            self.agent._finish(self.attempt)

    def status(self, state: str) -> None:
        self.agent._publish_status(state)

    def bad(self, reason: str) -> None:
        self.agent.counters.bad_messages += 1


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
