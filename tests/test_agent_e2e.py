"""The agent as a real process against a real Mosquitto: train and send, decline, abort mid-training, sit out."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker_fixtures import open_client
from helpers_models import digits_split, export_digits_mlp

from fedlite.demo.cluster import LocalFederation, wait_for, write_shard
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import Header, decode, encode_model, encode_weights
from fedlite.protocol.layout import num_params, weight_specs
from fedlite.protocol.messages import RoundAnnouncement, TrainingPlan, to_json
from fedlite.protocol.selection import RULE, Selection, draw

FED = "digits"
DEVICE = "dev-a"
RUN, RUN_STARTED = "a" * 32, time.time()  # the run this test plays the aggregator of
SEED = "5e" * 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[dict, bytes, dict[str, np.ndarray]]:
    return export_digits_mlp(tmp_path_factory.mktemp("model"))


class Coordinator:
    """Plays the aggregator's part with a plain MQTT client so the agent is tested on its own."""

    def __init__(self, fed: LocalFederation, manifest: dict, train_bytes: bytes) -> None:
        b = fed.broker
        self.client = open_client(b.host, b.port, "aggregator", fed.passwords["aggregator"])
        self.manifest = manifest
        self.sign = fed.sign
        for topic in (topics.all_updates(FED), topics.all_reports(FED), topics.all_statuses(FED)):
            self.client.subscribe(topic)
        header = Header(kind="model", federation=FED, round=0, model_hash=manifest["model_hash"],
                        extra={"manifest": manifest})
        topic = topics.model_topic(FED, manifest["model_hash"])
        self.client.publish(topic, self.sign(topic, encode_model(train_bytes, header)), retain=True)
        self.inbox: dict[str, list[bytes]] = {"updates": [], "reports": [], "status": []}
        self.announced: list[tuple[RoundAnnouncement, bytes]] = []  # each announcement, signed

    def announce(self, number: int, weights: dict[str, np.ndarray], plan: TrainingPlan, deadline: float = 60,
                 signing: str = "good", selected: bool = True, run: str = RUN,
                 run_started_at: float = RUN_STARTED) -> None:
        """Publish weights and the round; `signing` "none" sends the announcement unsigned, "forged" tampers.

        The threshold sits on the device's draw: one above it selects the device, the draw itself does not.
        """
        h = Header(kind="weights", federation=FED, round=number, model_hash=self.manifest["model_hash"], run=run)
        topic = topics.weights_topic(FED, number)
        self.client.publish(topic, self.sign(topic, encode_weights(weights, h)), retain=True)
        announcement = RoundAnnouncement(
            federation=FED, round=number, model_hash=self.manifest["model_hash"],
            model_topic=topics.model_topic(FED, self.manifest["model_hash"]),
            weights_topic=topics.weights_topic(FED, number), deadline=time.time() + deadline,
            selection=Selection(RULE, SEED, draw(SEED, DEVICE) + int(selected)),
            plan=plan, session=f"s{number}-{run[:4]}", issued_at=time.time(), run=run, run_started_at=run_started_at,
            epoch=1,
        )
        topic, payload = topics.round_topic(FED), to_json(announcement)
        signed = self.sign(topic, payload)
        if signing == "forged":  # the aggregator's signature over another plan
            signed = signed.replace(b'"epochs":', b'"epochs":9')
        self.client.publish(topic, payload if signing == "none" else signed, retain=True)
        self.announced.append((announcement, signed))

    def close(self, reason: str = "quorum") -> None:
        """Publish `closed` for the last announced attempt, as the aggregator does when it closes."""
        opened = self.announced[-1][0]
        closed = dataclasses.replace(opened, state="closed", accepted=1, reason=reason, issued_at=time.time())
        topic = topics.round_topic(FED)
        self.client.publish(topic, self.sign(topic, to_json(closed)), retain=True)

    def drain(self) -> None:
        while True:
            try:
                message = self.client.messages.get_nowait()
            except queue.Empty:
                return
            self.inbox[message.topic.split("/")[2]].append(bytes(message.payload))

    def reports(self) -> list[dict]:
        self.drain()
        return [json.loads(p) for p in self.inbox["reports"]]

    def statuses(self) -> list[dict]:
        self.drain()
        return [json.loads(p) for p in self.inbox["status"] if p]


@contextlib.contextmanager
def eligible_agent(tmp_path: Path, manifest: dict, train_bytes: bytes,
                   **agent: object) -> Iterator[tuple[LocalFederation, Coordinator, Any]]:
    """A broker, the coordinator and a real agent on 600 digits, once the agent has said it is eligible."""
    x_train, y_train, _, _ = digits_split()
    with LocalFederation(tmp_path / "run", FED, [DEVICE]) as fed:
        fed.start_broker()
        shard = write_shard(tmp_path / "dev-a.npz", x_train[:600], y_train[:600])
        config = fed.agent_config(DEVICE, shard, agent={"status_interval_seconds": 0.5, "max_epochs": 100000} | agent)
        coordinator = Coordinator(fed, manifest, train_bytes)
        process = fed.start(DEVICE, "agent", config)
        wait_for(lambda: any(s["eligible"] for s in coordinator.statuses()), 30, "an eligible status", [process])
        yield fed, coordinator, process


def test_agent_trains_declines_and_aborts(tmp_path: Path, exported):
    manifest, train_bytes, weights = exported
    with eligible_agent(tmp_path, manifest, train_bytes) as (fed, coordinator, agent):
        maps = Path(f"/proc/{agent.popen.pid}/maps").read_text()  # idle: neither the TFLite runtime nor the
        assert not [lib for lib in ("ai_edge_litert", "tflite_runtime", "cryptography") if lib in maps]  # crypto
        assert coordinator.statuses()[-1]["runtime"] == "ai-edge-litert"  # named without importing it

        # 1. selected, eligible: trains and sends an int8 update that decodes against the model's layout
        coordinator.announce(1, weights, TrainingPlan(epochs=2, batch_size=32, learning_rate=0.1))
        wait_for(lambda: coordinator.drain() or coordinator.inbox["updates"], 60, "the round 1 update", [agent])
        update = decode(coordinator.inbox["updates"][0])
        assert (update.header.kind, update.header.round, update.header.client_id) == ("update", 1, DEVICE)
        assert update.header.encoding == "int8" and update.header.num_examples == 480  # 600 minus 20 % held out
        assert set(update.tensors) == set(weights)
        assert sum(float(np.abs(t).sum()) for t in update.tensors.values()) > 0
        assert update.header.metrics["eval_accuracy_after"] > update.header.metrics["eval_accuracy_before"]

        # 2. unsigned and forged round announcements are refused: no training, no report
        coordinator.announce(2, weights, TrainingPlan(epochs=1), signing="none")
        coordinator.announce(2, weights, TrainingPlan(epochs=1), signing="forged")
        wait_for(lambda: "forged" in agent.log_tail(20), 20, "the forged announcement to be refused", [agent])
        assert "is not signed" in agent.log_tail(20)
        time.sleep(1.0)
        assert not coordinator.reports() and len(coordinator.drain() or coordinator.inbox["updates"]) == 1

        # 3. a closed gate: no training, a decline that names the gate
        fed.set_device_state(DEVICE, cpu_percent=95.0)
        coordinator.announce(2, weights, TrainingPlan(epochs=1))
        report = wait_for(lambda: [r for r in coordinator.reports() if r["round"] == 2], 30, "a decline", [agent])[0]
        assert report["kind"] == "declined" and report["reason"].startswith("idle: CPU busy: 95%")

        # 4. the charger is pulled during training: abort at the next batch, publish nothing
        fed.set_device_state(DEVICE)
        coordinator.announce(3, weights, TrainingPlan(epochs=20000, batch_size=8, learning_rate=0.01))
        wait_for(lambda: any(s["state"] == "training" for s in coordinator.statuses()), 30, "training", [agent])
        time.sleep(0.5)
        flipped = time.time()
        fed.set_device_state(DEVICE, plugged_in=False, battery_percent=90.0)
        report = wait_for(lambda: [r for r in coordinator.reports() if r["round"] == 3], 30, "an abort", [agent])[0]
        assert report["kind"] == "aborted" and report["reason"].startswith("charged: on battery")
        steps = int(report["reason"].rsplit("(after ", 1)[1].split(" ")[0])
        assert 0 < steps < 20000 * 60  # stopped long before the plan's end
        assert report["sent_at"] - flipped < 2.0
        time.sleep(1.0)
        coordinator.drain()
        assert len(coordinator.inbox["updates"]) == 1  # still only round 1's update
        assert "round 3 aborted: charged: on battery" in agent.log_tail(50)

        # 5. a round whose threshold is the device's own draw: followed (its mark advances), but it sits out
        fed.set_device_state(DEVICE)
        seen = len(coordinator.statuses())
        coordinator.announce(4, weights, TrainingPlan(epochs=1), selected=False)
        progress = fed.run_dir / "agents" / DEVICE / "state" / "progress.json"
        wait_for(lambda: json.loads(progress.read_text())["round"] == 4, 30, "round 4 to be followed", [agent])
        time.sleep(1.5)
        assert not [r for r in coordinator.reports() if r["round"] == 4]  # no decline either: it was not asked
        assert len(coordinator.inbox["updates"]) == 1
        assert all(s["state"] != "training" for s in coordinator.statuses()[seen:])
        assert "round 4" not in agent.log_tail(50)

        # 6. a plan in an encoding this agent cannot produce: declined with the reason, nothing trained
        fed.set_device_state(DEVICE)
        assert coordinator.statuses()[-1]["encodings"] == list(codecs.UPLINK)
        coordinator.announce(4, weights, TrainingPlan(epochs=1, encoding="int3"))
        report = wait_for(lambda: [r for r in coordinator.reports() if r["round"] == 4], 30, "a decline", [agent])[0]
        assert report["kind"] == "declined" and report["reason"] == "encoding: 'int3' is not one this agent can produce"
        assert len(coordinator.inbox["updates"]) == 1


def test_a_closed_round_stops_training_for_its_session_and_its_announcement_is_not_followed_again(tmp_path: Path,
                                                                                                    exported):
    manifest, train_bytes, weights = exported
    with eligible_agent(tmp_path, manifest, train_bytes) as (fed, coordinator, agent):

        # 1. the attempt closes (its quorum reached by others) while this device trains: it stops, sends nothing
        coordinator.announce(1, weights, TrainingPlan(epochs=20000, batch_size=8, learning_rate=0.01))
        wait_for(lambda: any(s["state"] == "training" for s in coordinator.statuses()), 30, "training", [agent])
        closed_at = time.time()
        coordinator.close()
        wait_for(lambda: "round 1 aborted: the round closed before training finished" in agent.log_tail(20), 30,
                 "the training to stop", [agent])
        assert time.time() - closed_at < 5
        # 2. the genuine open announcement of the closed attempt, re-published: below the mark, never trained
        opened = coordinator.announced[-1][1]
        coordinator.client.publish(topics.round_topic(FED), opened, retain=False)
        wait_for(lambda: "refused a round announcement (replayed)" in agent.log_tail(20), 30, "the replay refused",
                 [agent])
        time.sleep(1.0)
        assert not coordinator.reports()  # nobody needs an answer for a closed attempt
        assert not coordinator.inbox["updates"]

        # 3. the next round's open announcement is followed and trained
        coordinator.announce(2, weights, TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1))
        wait_for(lambda: coordinator.drain() or coordinator.inbox["updates"], 60, "the round 2 update", [agent])
        assert [decode(u).header.round for u in coordinator.inbox["updates"]] == [2]
        assert "Traceback" not in agent.log.read_text()


def test_agent_sends_ternary_updates_with_a_residual_that_survives_a_restart_and_resets_on_a_new_run(
        tmp_path: Path, exported) -> None:
    from fedlite.agent.residual import FILE, ResidualStore

    manifest, train_bytes, weights = exported
    layout, params = weight_specs(manifest), num_params(manifest)
    plan = TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1, encoding="ternary-ef")
    x_train, y_train, _, _ = digits_split()
    with LocalFederation(tmp_path / "run", FED, [DEVICE]) as fed:
        fed.start_broker()
        shard = write_shard(tmp_path / "dev-a.npz", x_train[:600], y_train[:600])
        config = fed.agent_config(DEVICE, shard, agent={"status_interval_seconds": 0.5})
        residual_file = tmp_path / "run" / "agents" / DEVICE / "state" / FILE
        coordinator = Coordinator(fed, manifest, train_bytes)
        agent = fed.start(DEVICE, "agent", config)
        wait_for(lambda: any(s["eligible"] and "ternary-ef" in s["encodings"] for s in coordinator.statuses()), 30,
                 "an eligible status listing ternary-ef", [agent])

        def round_update(number: int, **announce) -> tuple[bytes, dict[str, np.ndarray]]:
            coordinator.announce(number, weights, plan, **announce)
            wait_for(lambda: coordinator.drain() or len(coordinator.inbox["updates"]) >= number, 60,
                     f"the round {number} update", [agent])
            payload = coordinator.inbox["updates"][number - 1]
            message = decode(payload, shapes=layout)
            assert (message.header.encoding, message.header.round) == ("ternary-ef", number)
            # the agent saves the residual once the broker has acknowledged the update: wait for that write
            wait_for(lambda: (stored := ResidualStore(residual_file)._read()) is not None and stored[0].round == number,
                     30, f"the round {number} residual", [agent])
            return payload, message.tensors

        payload, sent = round_update(1)
        assert len(payload) < 0.05 * 4 * params  # a float32 update of this model is 4 B per weight
        assert all(len(np.unique(v)) <= 3 for v in sent.values()) and any(np.any(v) for v in sent.values())
        key, residual = ResidualStore(residual_file)._read()
        assert (key.run, key.model_hash, key.encoding, key.round) == (RUN, manifest["model_hash"], "ternary-ef", 1)
        assert set(residual) == set(sent) and sum(float(np.abs(r).sum()) for r in residual.values()) > 0

        fed.kill(DEVICE, signal.SIGTERM)
        restarted = time.time()
        agent = fed.start(DEVICE, "agent", config)
        wait_for(lambda: any(s["eligible"] and s["updated_at"] > restarted for s in coordinator.statuses()), 30,
                 "the restarted agent's status", [agent])
        round_update(2)
        key, _ = ResidualStore(residual_file)._read()
        assert (key.run, key.round) == (RUN, 2)
        assert "residual" not in agent.log_tail(200)  # the residual of round 1 was used, not reset

        other = "b" * 32
        round_update(3, run=other, run_started_at=RUN_STARTED + 100)
        key, _ = ResidualStore(residual_file)._read()
        assert (key.run, key.round) == (other, 3)
        assert "error-feedback residual of round 2 reset: a new run" in agent.log_tail(200)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_each_round_trains_in_a_child_process_the_agent_never_loads_numpy_and_survives_its_crash(tmp_path: Path,
                                                                                                 exported):
    manifest, train_bytes, weights = exported
    with eligible_agent(tmp_path, manifest, train_bytes) as (fed, coordinator, agent):
        pid = agent.popen.pid
        assert coordinator.statuses()[-1]["num_examples"] == 480  # counted by the start-up job's process

        # 1. a round trains in a child; afterwards the agent holds neither numpy nor the runtime, and no child
        coordinator.announce(1, weights, TrainingPlan(epochs=2, batch_size=32, learning_rate=0.1))
        wait_for(lambda: coordinator.drain() or coordinator.inbox["updates"], 60, "the round 1 update", [agent])
        wait_for(lambda: not _children(pid), 30, "the round's process to exit", [agent])
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "_multiarray_umath" not in maps and "ai_edge_litert" not in maps and "tflite_runtime" not in maps
        status = wait_for(lambda: [s for s in coordinator.statuses() if s["weights_round"] == 1], 30,
                          "a status naming the held weights")[-1]  # read by the round's process, reported by the agent
        assert status["weights_run"] == RUN and status["cached_models"] == [manifest["model_hash"]]

        # 2. the round's process dies mid-training (SIGKILL): the round is reported aborted, the agent goes on
        seen = len(coordinator.statuses())
        coordinator.announce(2, weights, TrainingPlan(epochs=20000, batch_size=8, learning_rate=0.01))
        wait_for(lambda: any(s["state"] == "training" for s in coordinator.statuses()[seen:]), 30, "training",
                 [agent])
        (child,) = _children(pid)
        os.kill(child, signal.SIGKILL)
        report = wait_for(lambda: [r for r in coordinator.reports() if r["round"] == 2], 30, "an abort", [agent])[0]
        assert report["kind"] == "aborted" and report["reason"] == (
            "the round's process failed: its process was killed by SIGKILL"), report
        assert agent.popen.poll() is None

        # 3. and trains the next round as before
        coordinator.announce(3, weights, TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1))
        wait_for(lambda: len(coordinator.drain() or coordinator.inbox["updates"]) == 2, 60, "the round 3 update",
                 [agent])
        assert decode(coordinator.inbox["updates"][1]).header.round == 3


def test_keep_process_seconds_serves_the_next_round_from_the_same_process_then_lets_it_go(tmp_path: Path, exported):
    manifest, train_bytes, weights = exported
    with eligible_agent(tmp_path, manifest, train_bytes, keep_process_seconds=4) as (fed, coordinator, agent):
        pid = agent.popen.pid
        coordinator.announce(1, weights, TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1))
        wait_for(lambda: coordinator.drain() or coordinator.inbox["updates"], 60, "the round 1 update", [agent])
        (kept,) = _children(pid)  # kept after round 1, waiting for the next job
        coordinator.announce(2, weights, TrainingPlan(epochs=1, batch_size=32, learning_rate=0.1))
        wait_for(lambda: len(coordinator.drain() or coordinator.inbox["updates"]) == 2, 60, "the round 2 update",
                 [agent])
        assert _children(pid) == [kept]
        wait_for(lambda: not _children(pid), 20, "the kept process to be let go", [agent])
        assert agent.popen.poll() is None
