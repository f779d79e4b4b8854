"""A federation in one process, without a broker: the aggregator's own synchronous round orchestrator (selection,
round attempt, validation, influence bounds, the configured strategy) and downlink, and devices that answer each
announcement as an agent does (weights through `agent.downlink.fetch`, training through the runtime's `Trainer` in a
real TFLite interpreter, the update through the protocol's encoder with the device's error-feedback residual). An
in-process retained store stands in for the broker's retained topics; broadcasts are signed and verified as on one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedlite import __version__
from fedlite.agent.data import LocalData, split
from fedlite.agent.downlink import HeldWeights, Receive, fetch
from fedlite.agent.residual import ResidualKey, ResidualStore
from fedlite.agent.round import round_seed
from fedlite.aggregator import orchestrators
from fedlite.aggregator.announcer import Announcer
from fedlite.aggregator.bootstrap import Evaluator, RunFailed
from fedlite.aggregator.commit import CommitRefused, check_step
from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.downlink import Downlink, RoundWeights
from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.kpis import KpiTracker, Sketcher
from fedlite.aggregator.record import RoundRecord
from fedlite.aggregator.retained import RetainedTopics
from fedlite.aggregator.rounds import RoundAttempt, RoundOutcome
from fedlite.aggregator.run_identity import RunIdentity
from fedlite.aggregator.strategies import make_server_optimizer
from fedlite.aggregator.validation import Rejected
from fedlite.demo.cluster import agent_seed
from fedlite.demo.retained_store import RetainedStore
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import Header, Limits, encode_model, encode_update_with_residual, update_limits
from fedlite.protocol.layout import num_params, weight_specs
from fedlite.protocol.messages import DeviceReport, DeviceStatus, RoundAnnouncement, from_json
from fedlite.protocol.selection import is_selected
from fedlite.protocol.signing import Signer, generate_keypair
from fedlite.runtime.trainer import Trainer, local_update

log = logging.getLogger("fedlite.simulation")
Weights = dict[str, np.ndarray]
Arrays = tuple[np.ndarray, np.ndarray]


class VirtualDevice:
    """One device: its examples split as the agent splits them (`[data] seed` = `seed`), its shuffles, the weights it
    holds and its error-feedback residual (on disk)."""

    def __init__(self, client_id: str, examples: Arrays, holdout: float, seed: int, state_dir: Path) -> None:
        self.client_id = client_id
        self.data: LocalData = split(examples[0], examples[1], holdout, seed)
        home = state_dir / client_id
        home.mkdir(parents=True, exist_ok=True)
        self.held = HeldWeights(home / "held_weights.npz")
        self.residuals = ResidualStore(home / "residual.npz")
        self.seed = agent_seed(seed, client_id)  # its [agent] seed
        self.has_model = False

    def status(self) -> DeviceStatus:
        return DeviceStatus(client_id=self.client_id, state="online", eligible=True,
                            num_examples=int(len(self.data.x_train)), runtime="in-process",
                            agent_version=__version__, updated_at=time.time(), encodings=list(codecs.UPLINK))

    def answer(self, a: RoundAnnouncement, trainer: Trainer, receive: Receive,
               model_bytes: int) -> bytes | DeviceReport:
        """The update frame for round `a` (or the report of a device whose training diverged); `receive` gives the
        verified payloads of retained topics, `model_bytes` is what the model costs a device that lacks it."""
        received = 0 if self.has_model else model_bytes
        self.has_model = True
        rng = np.random.default_rng(round_seed(self.seed, self.client_id, a.round))  # as the agent's round process
        fetched = fetch(a, trainer.manifest, self.held, receive, lambda reason: log.warning(
            "%s: bad downlink frame (%s)", self.client_id, reason))
        plan, data = a.plan, self.data
        x, y = data.x_train, data.y_train
        if 0 < plan.max_examples < len(x):
            pick = rng.choice(len(x), size=plan.max_examples, replace=False)
            x, y = x[pick], y[pick]
        trainer.set_weights(fetched.flat)
        before = trainer.evaluate(data.x_holdout, data.y_holdout) if len(data.x_holdout) else None
        delta, result = local_update(trainer, fetched.flat, x, y, plan.epochs, plan.batch_size, plan.learning_rate,
                                     plan.proximal_mu, rng)
        if result.aborted:
            return DeviceReport(client_id=self.client_id, round=a.round, kind="aborted", reason=str(result.reason),
                                sent_at=time.time(), run=a.run, session=a.session)
        metrics = {"train_loss": float(result.loss), "steps": float(result.steps)}
        if before is not None:
            after = trainer.evaluate(data.x_holdout, data.y_holdout)
            metrics |= {"eval_loss_before": before[0], "eval_accuracy_before": before[1],
                        "eval_loss_after": after[0], "eval_accuracy_after": after[1]}
        header = Header(kind="update", federation=a.federation, round=a.round, model_hash=a.model_hash,
                        client_id=self.client_id, num_examples=int(len(x)), run=a.run,
                        metrics={k: float(v) for k, v in metrics.items() if np.isfinite(v)},
                        extra={"bytes_down": received + fetched.bytes})
        key = ResidualKey(a.run, a.model_hash, plan.encoding, a.round)
        residual = self.residuals.load(key) if codecs.get(plan.encoding).residual else None
        payload, left = encode_update_with_residual(delta, header, encoding=plan.encoding, residual=residual,
                                                    stochastic=plan.stochastic_rounding, rng=rng)
        self.residuals.stage(key, left)
        self.residuals.commit()
        return payload


class DevicesAnswer:
    """The run's announcer: announces as the aggregator does, then lets the selected devices answer in turn (in an
    order drawn per round) until the attempt's closing rule decides."""

    def __init__(self, announcer: Announcer, host: InProcessFederation) -> None:
        self.announcer = announcer
        self.host = host

    def open(self, attempt: RoundAttempt, weights: RoundWeights) -> None:
        self.announcer.open(attempt, weights)
        self.host.answer(attempt)

    def closed(self, record: RoundRecord) -> None:
        self.announcer.closed(record)

    def done(self, total: int, last: RoundRecord | None) -> None:
        self.announcer.done(total, last)


class InProcessFederation:
    """The seams of the aggregator service the round orchestrator drives, over in-process devices."""

    log = log

    def __init__(self, config: AggregatorConfig, manifest: dict[str, Any], train_bytes: bytes,
                 devices: list[VirtualDevice], test: Arrays | None, state_dir: Path) -> None:
        self.config = config
        self.federation = config.federation.name
        self.manifest, self.model_hash = manifest, manifest["model_hash"]
        self.specs = weight_specs(manifest)
        self.sketcher = Sketcher(num_params(manifest))
        self.limits = update_limits([tuple(s) for _, s in self.specs],
                                    Limits(max_payload_bytes=config.server.max_update_bytes), config.training.encoding)
        self.stop_event = threading.Event()
        self.fleet = Fleet(config.rounds.status_ttl_seconds)
        self.signer = Signer.from_file(generate_keypair(state_dir / "keys")[0])  # devices pin its public key
        self.store = RetainedStore()
        self.retained = RetainedTopics(self.signer, None)
        self.retained.attach(self.store)
        self.identity = RunIdentity.start(state_dir)
        model = config.model
        self.downlink = Downlink(self.federation, self.model_hash, manifest, self.retained, self.run_id,
                                 dtype=model.downlink_dtype, delta_encoding=model.downlink_delta)
        self.announcer = DevicesAnswer(Announcer(self.federation, self.model_hash, config.training, self.retained,
                                                 lambda: self.identity), self)
        model_topic = topics.model_topic(self.federation, self.model_hash)
        self.model_bytes = len(self.signer.sign(model_topic, encode_model(train_bytes, Header(
            kind="model", federation=self.federation, round=0, model_hash=self.model_hash,
            extra={"manifest": manifest}))))  # what a device downloads for its first round
        self.cluster = None
        self.current: RoundAttempt | None = None
        self.history: list[dict[str, Any]] = []
        self.devices = {d.client_id: d for d in devices}
        self.trainer = Trainer(train_bytes, manifest)  # the devices' interpreter: they take turns, as in an agent
        self.evaluator = Evaluator(train_bytes, manifest, test)
        self.kpis = KpiTracker(config.kpis)

    # --- what the orchestrator uses ---------------------------------------------------------------

    def housekeeping(self, number: int, phase: str) -> None:
        """Every device says it is online and eligible (they are always available here)."""
        for device in self.devices.values():
            self.fleet.update(device.status())

    def selectable(self) -> list[str]:
        return self.fleet.eligible(encoding=self.config.training.encoding)

    def refuse(self, kind: str, reason: str, detail: str, number: int | None = None) -> None:
        log.warning("round %s: %s refused (%s): %s", number, kind, reason, detail)

    def run_id(self) -> str:
        return self.identity.run

    def answer(self, attempt: RoundAttempt) -> None:
        """The announced devices' updates (or reports), offered to the attempt as the inbox would."""
        a = from_json(RoundAnnouncement, self.receive([topics.round_topic(self.federation)], 0)[0] or b"")
        chosen = [c for c in sorted(self.devices) if is_selected(a.selection, c)]
        np.random.default_rng([self.config.rounds.seed, a.round, 1]).shuffle(chosen)
        for client in chosen:
            if attempt.wait(0) is not None:
                break  # closed by its rule: the others' updates would be late
            answer = self.devices[client].answer(a, self.trainer, self.receive, self.model_bytes)
            if isinstance(answer, DeviceReport):
                attempt.report(answer)
                continue
            try:
                attempt.offer(answer, client)
            except Rejected as exc:
                log.warning("round %d: update from %s refused: %s", a.round, client, exc)

    def receive(self, names: list[str], wait: float) -> list[bytes | None]:
        """What the retained store holds on `names`, verified as an agent verifies it (`wait`: nothing to wait for)."""
        verifier = self.signer.verifier()
        return [None if p is None else verifier.verify(name, p) for name, p in zip(names, self.store.receive(names, 0),
                                                                                   strict=True)]

    # --- the run ---------------------------------------------------------------------------------

    def run(self, weights: Weights, show: Callable[[RoundRecord], None]) -> tuple[list[RoundRecord], Weights]:
        """Every round, attempt after attempt until one commits (as the service does); the records and weights."""
        server = self.config.server
        optimizer = make_server_optimizer(server.optimizer, config=server.strategies[server.optimizer])
        opt_state = optimizer.init(weights)
        self.kpis.initial_accuracy = self.evaluator.evaluate(weights)["accuracy"]
        orchestrator = orchestrators.make("sync", self)
        records: list[RoundRecord] = []
        for number in range(1, self.config.rounds.total + 1):
            for attempt in range(1, self.config.rounds.max_attempts + 1):
                outcome = orchestrator.attempt(number, attempt, weights)
                assert outcome is not None  # nothing stops an in-process run
                committed = self._commit(outcome, weights, optimizer, opt_state) if outcome.complete else None
                self.history.append(outcome.record.to_dict())  # what the next rounds' norm bounds read
                records.append(outcome.record)
                show(outcome.record)
                if committed is not None:
                    weights, opt_state = committed
                    break
            else:
                raise RunFailed(f"round {number} was not completed in {self.config.rounds.max_attempts} attempts "
                                f"({_why(records[-1], self.config.rounds.min_accepted)})")
        self.announcer.done(self.config.rounds.total, records[-1] if records else None)
        self.downlink.finish()
        return records, weights

    def _commit(self, outcome: RoundOutcome, weights: Weights, optimizer: Any,
                opt_state: Any) -> tuple[Weights, Any] | None:
        """The server step, its bound and the evaluation (as `Committer.commit`, without the durable state); None
        and the record marked failed if the step is refused."""
        record = outcome.record
        new_weights, new_state = optimizer.step(weights, outcome.aggregate, opt_state)
        try:
            check_step(weights, new_weights, self.config.server.max_step_ratio)
        except CommitRefused as exc:
            record.status, record.close_reason, record.reason = "failed", "failed", str(exc)
            self.announcer.closed(record)
            return None
        evaluation = self.evaluator.evaluate(new_weights)
        record.accuracy, record.loss = evaluation["accuracy"], evaluation["loss"]
        record.kpis = self.kpis.observe(record, outcome.cosines)
        record.completed_at = time.time()
        return new_weights, new_state


def _why(record: RoundRecord, quorum: int) -> str:
    """What the last attempt of a round that never completed says about it, in a few words."""
    if record.reason:
        return f"last attempt: {record.reason}"
    refused = ", ".join(f"{n} {reason}" for reason, n in sorted(record.rejected.items()))
    return (f"last attempt: {record.accepted} of {record.selected} updates accepted, quorum {quorum}"
            + (f"; refused: {refused}" if refused else ""))


def run_in_process(config: AggregatorConfig, devices: dict[str, Arrays], test: Arrays | None, model_dir: Path | None,
                   holdout: float, state_dir: Path,
                   show: Callable[[RoundRecord], None]) -> tuple[list[RoundRecord], Weights, float | None]:
    """(records, final weights, accuracy before round 1) of a run of `config` over `devices`."""
    import shutil

    from fedlite.aggregator.bootstrap import initial_model
    from fedlite.aggregator.export import version_dir

    models = state_dir / "models"
    if model_dir is not None:
        shutil.copytree(model_dir, version_dir(models, 0), dirs_exist_ok=True)
    representative = test[0][: config.evaluation.calibration_examples] if test is not None else None
    manifest, train_bytes, weights = initial_model(config, models, representative)
    virtual = [VirtualDevice(name, examples, holdout, config.rounds.seed, state_dir / "devices")
               for name, examples in devices.items()]
    federation = InProcessFederation(config, manifest, train_bytes, virtual, test, state_dir)
    history, weights = federation.run(weights, show)
    return history, weights, federation.kpis.initial_accuracy
