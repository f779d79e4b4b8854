"""The device under faults of its own: a model that does not arrive (the watchdog is still fed), data that does
not fit the model (declined as data_mismatch, the agent keeps running)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
from helpers_models import digits_split, export_digits_mlp
from test_agent_e2e import DEVICE, FED, Coordinator

from fedlite.demo.cluster import LocalFederation, wait_for, write_shard
from fedlite.protocol import topics
from fedlite.protocol.messages import TrainingPlan

WATCHDOG_SECONDS = 3.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[dict, bytes, dict[str, np.ndarray]]:
    return export_digits_mlp(tmp_path_factory.mktemp("model"))


def test_the_watchdog_is_fed_while_the_agent_waits_for_a_model_that_does_not_come(tmp_path: Path, exported,
                                                                                   monkeypatch):
    manifest, train_bytes, weights = exported
    x, y, _, _ = digits_split()
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))  # the agent process inherits systemd's variables
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_SECONDS * 1e6)))
    with LocalFederation(tmp_path / "run", FED, [DEVICE]) as fed:
        fed.start_broker()
        coordinator = Coordinator(fed, manifest, train_bytes)
        model_topic = topics.model_topic(FED, manifest["model_hash"])
        coordinator.client.publish(model_topic, b"", retain=True)  # the model is not there: a slow download
        shard = write_shard(tmp_path / "dev.npz", x[:300], y[:300])
        agent = fed.start(DEVICE, "agent", fed.agent_config(DEVICE, shard, agent={"status_interval_seconds": 0.5}))
        wait_for(lambda: any(s["eligible"] for s in coordinator.statuses()), 30, "an eligible status", [agent])
        coordinator.announce(1, weights, TrainingPlan(epochs=1), deadline=12)
        pings, end = [], time.monotonic() + 12
        while time.monotonic() < end:
            try:
                if b"WATCHDOG=1" in listener.recv(4096):
                    pings.append(time.monotonic())
            except TimeoutError:
                continue
        wait_for(lambda: any(r["kind"] == "aborted" for r in coordinator.reports()), 30, "the abort", [agent])
        assert agent.alive() and "did not arrive" in agent.log.read_text()
    gaps = np.diff(pings)
    assert len(pings) >= 5 and gaps.max() < WATCHDOG_SECONDS, (len(pings), gaps.max() if len(gaps) else None)


def test_data_that_does_not_fit_the_model_is_declined_as_data_mismatch_and_the_agent_keeps_running(tmp_path: Path,
                                                                                                  exported):
    manifest, train_bytes, weights = exported
    rng = np.random.default_rng(0)
    with LocalFederation(tmp_path / "run", FED, [DEVICE]) as fed:
        fed.start_broker()
        coordinator = Coordinator(fed, manifest, train_bytes)
        shard = write_shard(tmp_path / "dev.npz", rng.random((200, 10)), rng.integers(0, 10, 200))  # 10 features
        agent = fed.start(DEVICE, "agent", fed.agent_config(DEVICE, shard, agent={"status_interval_seconds": 0.5}))
        wait_for(lambda: any(s["eligible"] for s in coordinator.statuses()), 30, "an eligible status", [agent])
        for number in (1, 2):  # every selection: declined, never a crash
            coordinator.announce(number, weights, TrainingPlan(epochs=1))
            report = wait_for(lambda n=number: [r for r in coordinator.reports() if r["round"] == n], 60,
                              f"the round {number} report", [agent])[0]
            assert report["kind"] == "declined" and report["reason"].startswith("data_mismatch:"), report
            assert "[10]" in report["reason"] and "[64]" in report["reason"]
        assert agent.alive() and "Traceback" not in agent.log.read_text()
        assert not coordinator.inbox["updates"]
