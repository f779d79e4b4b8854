"""Shared by the fault and privacy tests: a federation of real processes, a pre-exported model, a broker tap.

The initial TFLite export costs several seconds of TensorFlow; it is made once per test session and
copied into each aggregator's state directory, where the aggregator reuses it exactly as after a restart.
"""

from __future__ import annotations

import json
import queue
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from broker_fixtures import Session, open_client
from helpers_models import digits_split

from fedlite.demo.cluster import AGGREGATOR_USER, LocalFederation, Process, write_shard
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import read_header
from fedlite.protocol.messages import DeviceStatus, to_json
from fedlite.protocol.selection import is_selected
from fedlite.protocol.signing import MAGIC as SIGNED
from fedlite.protocol.signing import SignatureError, Verifier

FED = "faults"
MODEL = {"arch": "mlp", "input_shape": [64], "classes": 10, "export_every": 0}
CALIBRATION = 200  # the aggregator's default evaluation.calibration_examples


# --- data and model ---------------------------------------------------------------------------------


def write_shards(folder: Path, agents: list[str], extra: int = 30) -> dict[str, Path]:
    """Label-sorted (non-IID) digits shards, one per agent, plus the server's test set as folder/test.npz."""
    x_train, y_train, x_test, y_test = digits_split()
    order = np.argsort(y_train, kind="stable")
    shards = {}
    for i, (agent, part) in enumerate(zip(agents, np.array_split(order, len(agents)), strict=True)):
        mix = np.concatenate([part, np.random.default_rng(i).choice(len(x_train), extra, replace=False)])
        shards[agent] = write_shard(folder / f"{agent}.npz", x_train[mix], y_train[mix])
    np.savez(folder / "test.npz", x=x_test, y=y_test)
    return shards


def initial_model(cache: Path) -> Path:
    """The aggregator's round-0 export (models/round-00000), made once into `cache`."""
    folder = cache / "round-00000"
    if not (folder / "manifest.json").is_file():
        from fedlite.aggregator.config import ModelSection
        from fedlite.aggregator.export import export_round

        _, _, x_test, _ = digits_split()
        export_round(ModelSection(**MODEL), folder, None, x_test[:CALIBRATION])
    return folder


# --- a federation -----------------------------------------------------------------------------------


def start_federation(fed: LocalFederation, data: Path, agents: list[str], model: Path,
                     agent_tables: dict[str, dict[str, Any]] | None = None,
                     **aggregator_tables: dict[str, Any]) -> Path:
    """Broker, agents (started), the pre-exported model in the aggregator's state dir; the aggregator config."""
    fed.start_broker()
    shards = write_shards(data, agents) if agents else {}  # none: the caller wrote them and starts its agents
    for agent in agents:
        tables = {"agent": {"status_interval_seconds": 0.5}} | (agent_tables or {}).get(agent, {})
        fed.start(agent, "agent", fed.agent_config(agent, shards[agent], **tables))
    shutil.copytree(model, fed.run_dir / "aggregator" / "models" / model.name)
    tables: dict[str, dict[str, Any]] = {
        "model": dict(MODEL),
        "rounds": {"total": 10, "clients_per_round": len(agents), "over_selection": 0.0, "deadline_seconds": 30.0,
                   "wait_for_devices_seconds": 20.0},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 0.1},
        "evaluation": {"test_data": str(data / "test.npz")},
    }
    for table, values in aggregator_tables.items():
        tables[table] = tables.get(table, {}) | values
    return fed.aggregator_config(**tables)


def ghost(fed: LocalFederation, name: str) -> Session:
    """An enrolled device that says it is eligible (retained status) and then never answers a round.

    Selected with the real agents, it keeps every round open until its deadline, which gives a test a
    deterministic window in the middle of a round.
    """
    b = fed.broker
    client = open_client(b.tls_host, b.tls_port, name, fed.passwords[name], client_id=f"{name}-ghost",
                         ca_file=b.ca_file)
    status = DeviceStatus(client_id=name, state="online", eligible=True, updated_at=time.time(),
                          encodings=list(codecs.UPLINK))
    client.publish(topics.status_topic(fed.federation, name), to_json(status), retain=True)
    return client


def history(fed: LocalFederation) -> list[dict[str, Any]]:
    path = fed.run_dir / "aggregator" / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def completed(fed: LocalFederation, number: int) -> dict[str, Any] | None:
    """The history record of round `number` once it is complete, else None."""
    return next((r for r in history(fed) if r["round"] == number and r["status"] == "complete"), None)


def checkpoints_dir(fed: LocalFederation) -> Path:
    return fed.run_dir / "aggregator" / "checkpoints"


# --- a tap on the broker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One message the broker relayed to the tap: `raw` as relayed, `payload` with a signature checked and removed
    (empty when the signature does not verify: not a broadcast of the aggregator's)."""

    topic: str
    raw: bytes
    payload: bytes
    at: float

    @property
    def kind(self) -> str:
        return self.topic.split("/")[2]

    @property
    def client(self) -> str:
        return topics.client_of(self.topic)

    def json(self) -> dict[str, Any]:
        return json.loads(self.payload)


def tap_topics(federation: str) -> list[str]:
    """Everything of a federation the ACL lets the aggregator's account read (it may not read `#`)."""
    root = f"{topics.ROOT}/{federation}"
    return [topics.round_topic(federation), f"{root}/model/#", f"{root}/weights/#", f"{root}/delta/#",
            topics.deploy_topic(federation),
            topics.all_updates(federation), topics.all_statuses(federation), topics.all_reports(federation),
            topics.all_secagg(federation), topics.all_relays(federation)]


class Tap:
    """An extra client with the aggregator's credentials (another client id) that records every message.

    Its session is persistent (QoS 1, clean_start False), so a broker restart loses nothing it subscribed to.
    Broadcasts signed by the aggregator are verified against the federation's public key, then unwrapped.
    """

    def __init__(self, fed: LocalFederation, client_id: str = "tap") -> None:
        b = fed.broker
        self.session = open_client(b.host, b.port, AGGREGATOR_USER, fed.passwords[AGGREGATOR_USER],
                                   client_id=client_id, clean_start=False, session_expiry=3600)
        for topic in tap_topics(fed.federation):
            self.session.subscribe(topic)
        self.seen: list[Seen] = []
        self._verifier = Verifier.from_files([str(fed.signing_key.with_suffix(".pub"))])

    def poll(self, timeout: float = 0.0) -> list[Seen]:
        """Move what has arrived into `seen` (waiting up to `timeout` for the first message); the new ones."""
        new: list[Seen] = []
        try:
            message = self.session.messages.get(timeout=timeout) if timeout else self.session.messages.get_nowait()
            while True:
                raw = bytes(message.payload)
                try:
                    payload = self._verifier.verify(message.topic, raw) if raw.startswith(SIGNED) else raw
                except SignatureError:  # e.g. genuine signed bytes moved to another topic
                    payload = b""
                arrived = time.time() - (time.monotonic() - message.timestamp)  # paho stamps arrival, monotonic
                new.append(Seen(message.topic, raw, payload, arrived))
                message = self.session.messages.get_nowait()
        except queue.Empty:
            pass
        self.seen.extend(new)
        return new

    def wait(self, match: Callable[[Seen], bool], timeout: float, what: str, processes: Iterable[Process] = (),
             since: int = 0) -> Seen:
        """The first message from index `since` on that matches, waiting for it; TimeoutError with log tails."""
        end = time.time() + timeout
        checked = since
        while True:
            for message in self.seen[checked:]:
                if match(message):
                    return message
            checked = max(checked, len(self.seen))
            if time.time() >= end:
                tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in processes)
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
            self.poll(0.05)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str,
                   processes: Iterable[Process] = ()) -> None:
        """Poll until `condition()` (which may look at `seen`) holds; TimeoutError with log tails."""
        end = time.time() + timeout
        while not condition():
            if time.time() >= end:
                tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in processes)
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
            self.poll(0.05)

    def close(self) -> None:
        self.session.close()


def announcement(number: int, state: str = "open") -> Callable[[Seen], bool]:
    """Matches the round topic's announcement of round `number`."""
    def match(m: Seen) -> bool:
        if m.kind != "round" or not m.payload:
            return False
        a = m.json()
        return a["round"] == number and a["state"] == state
    return match


def chosen(a: dict[str, Any], candidates: Iterable[str]) -> list[str]:
    """The candidates a round announcement (its JSON) selects, by the rule each device applies to itself."""
    return [c for c in candidates if is_selected(a, c)]


def update_round(m: Seen) -> int | None:
    """The round an update on the wire is for (None for anything else, or a payload that does not decode)."""
    if m.kind != "updates":
        return None
    try:
        return read_header(m.payload).round
    except ValueError:
        return None


def updates_for(seen: Iterable[Seen], number: int) -> dict[str, int]:
    """client -> how many updates for round `number` the broker relayed."""
    counts: dict[str, int] = {}
    for m in seen:
        if update_round(m) == number:
            counts[m.client] = counts.get(m.client, 0) + 1
    return counts
