"""The aggregator with real agent processes and a real Mosquitto: rounds, hostile updates, SIGKILL."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
from broker_fixtures import open_client
from federation_helpers import history, write_shards

from fedlite.demo.cluster import LocalFederation, wait_for
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, encode_update
from fedlite.protocol.messages import DeviceStatus, to_json
from fedlite.protocol.selection import is_selected
from fedlite.protocol.signing import Verifier

FED = "digits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(fed: LocalFederation, tmp_path: Path, agents: list[str], **aggregator_tables) -> Path:
    """Broker, a non-IID digits shard per agent, agent configs and the aggregator config."""
    fed.start_broker()
    for agent, shard in write_shards(tmp_path, agents, extra=60).items():
        fed.start(agent, "agent", fed.agent_config(agent, shard, agent={"status_interval_seconds": 0.5}))
    tables = {
        "model": {"arch": "mlp", "input_shape": [64], "classes": 10, "export_every": 0},
        "rounds": {"total": 10, "clients_per_round": len(agents), "over_selection": 0.0, "deadline_seconds": 30.0,
                   "wait_for_devices_seconds": 20.0},
        "training": {"epochs": 2, "batch_size": 16, "learning_rate": 0.1},
        "evaluation": {"test_data": str(tmp_path / "test.npz")},
    }
    for table, values in aggregator_tables.items():
        tables[table] = tables.get(table, {}) | values
    return fed.aggregator_config(**tables)


def _completed(fed: LocalFederation) -> list[dict]:
    return [r for r in history(fed) if r["status"] == "complete"]


def test_ten_rounds_raise_accuracy_and_export_each_round(tmp_path):
    agents = ["dev-1", "dev-2", "dev-3"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = _setup(fed, tmp_path, agents, model={"export_every": 1})
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: aggregator.popen.poll() is not None, 300, "the aggregator to finish",
                 fed.processes.values(), poll=1)
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        history = _completed(fed)
        assert [r["round"] for r in history] == list(range(1, 11))
        assert all(r["accepted"] == 3 for r in history)
        accuracy = [r["accuracy"] for r in history]
        assert accuracy[-1] >= 0.85 and accuracy[-1] > accuracy[0] + 0.1, accuracy
        models = fed.run_dir / "aggregator" / "models"
        for number in range(1, 11):
            manifest = json.loads((models / f"round-{number:05d}" / "manifest.json").read_text())
            assert manifest["files"]["infer_int8"]["bytes"] > 0
        assert sum(r["bytes_up"] for r in history) > 0
        # bytes down as the devices measured them: round 1 the model and the full float32 weights, then the
        # int8 delta since the round each device took part in
        float32_weights = 4 * manifest["num_params"]
        assert all(r["downloads"] == 3 for r in history)
        assert history[0]["bytes_down"] / 3 > float32_weights
        later = [r["bytes_down"] / r["downloads"] for r in history[1:]]
        assert max(later) < 0.3 * float32_weights, later
        assert "weights from delta" in fed.processes["dev-1"].log_tail(200)


def test_hostile_updates_are_refused_and_counted_while_the_round_completes(tmp_path):
    agents = ["dev-1", "dev-2"]
    silent, outsider = "dev-x", "mallory"
    prometheus = _free_port()
    with LocalFederation(tmp_path / "run", FED, [*agents, silent, outsider]) as fed:
        config = _setup(fed, tmp_path, agents,
                        rounds={"total": 2, "clients_per_round": 3, "quorum": 2, "deadline_seconds": 20.0},
                        server={"max_update_bytes": 200_000}, metrics={"prometheus_port": prometheus},
                        training={"encoding": "int8"})  # dev-x's status lists no encodings: int8 only
        b = fed.broker
        observer = open_client(b.host, b.port, "aggregator", fed.passwords["aggregator"], client_id="observer")
        observer.subscribe(topics.round_topic(FED))
        observer.subscribe(topics.update_topic(FED, "dev-1"))
        clients = {name: open_client(b.tls_host, b.tls_port, name, fed.passwords[name], client_id=f"{name}-t",
                                     ca_file=b.ca_file) for name in (silent, outsider)}
        # dev-x says it is eligible, so it is selected; it will only ever send bad updates
        status = DeviceStatus(client_id=silent, state="online", eligible=True, updated_at=time.time())
        clients[silent].publish(topics.status_topic(FED, silent), to_json(status), retain=True)
        aggregator = fed.start("aggregator", "aggregator", config)

        messages: dict[str, list[bytes]] = {"round": [], "updates": []}

        def seen(kind: str) -> list[bytes]:
            while not observer.messages.empty():
                m = observer.messages.get()
                messages[m.topic.split("/")[2]].append(bytes(m.payload))
            return messages[kind]

        verifier = Verifier.from_files([str(fed.signing_key.with_suffix(".pub"))])
        rounds = lambda: [json.loads(verifier.verify(topics.round_topic(FED), p)) for p in seen("round")]  # noqa: E731
        announcement = wait_for(lambda: [r for r in rounds() if r["round"] == 1], 120, "round 1",
                                fed.processes.values())[0]
        assert is_selected(announcement, silent)
        manifest = json.loads((fed.run_dir / "aggregator/models/round-00000/manifest.json").read_text())
        good = {w["name"]: np.zeros(w["shape"], np.float32) for w in manifest["weights"]}

        def update(client: str, round_number: int, tensors: dict) -> bytes:
            header = Header(kind="update", federation=FED, round=round_number, model_hash=manifest["model_hash"],
                            client_id=client, num_examples=10, run=announcement["run"])
            return encode_update(tensors, header)

        wrong_shape = dict(good, **{manifest["weights"][0]["name"]: np.zeros((3, 3), np.float32)})
        nan = {k: np.full(v.shape, np.nan, np.float32) for k, v in good.items()}
        hostile = [
            (silent, update(silent, 0, good)),  # stale
            (silent, update(silent, 7, good)),  # future
            (silent, update(silent, 1, wrong_shape)),
            (silent, update(silent, 1, nan)),
            (silent, b"FLT\x02\x00" + bytes(300_000)),  # oversized
            (silent, b"not a frame at all"),
            (outsider, update(outsider, 1, good)),  # not selected
        ]
        for client, payload in hostile:
            clients[client].publish(topics.update_topic(FED, client), payload)
        injected = {payload for _, payload in hostile}
        real = wait_for(lambda: [p for p in seen("updates") if p not in injected], 60, "dev-1's own update",
                        fed.processes.values())[0]
        # dev-1's own credentials: the broker makes the client id the username, so the agent is stopped first
        # (two connections with one id would take the session from each other) and started again after
        fed.kill("dev-1", signal.SIGTERM)
        dev_1 = open_client(b.tls_host, b.tls_port, "dev-1", fed.passwords["dev-1"], ca_file=b.ca_file)
        dev_1.publish(topics.update_topic(FED, "dev-1"), real)  # a replay: a duplicate, refused before decoding
        dev_1.close()
        fed.start("dev-1-again", "agent", fed.run_dir / "agents" / "dev-1" / "agent.toml")

        wait_for(lambda: _completed(fed), 60, "round 1 to close", fed.processes.values())
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/metrics", timeout=5) as response:
            scraped = response.read().decode()
        assert 'fedlite_updates_rejected_total{federation="digits",reason="duplicate"} 1.0' in scraped
        assert 'fedlite_rounds_total{federation="digits",status="complete"} 1.0' in scraped
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus}/healthz", timeout=5) as response:
            health = json.loads(response.read())
        assert response.status == 200 and health["status"] == "ok" and health["seconds_since_tick"] < 60, health
        wait_for(lambda: aggregator.popen.poll() is not None, 180, "the aggregator to finish",
                 fed.processes.values(), poll=1)
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        first = history(fed)[0]
        assert first["status"] == "complete" and first["accepted"] == 2 and first["timed_out"] == 1
        assert first["rejected"] == {"stale": 1, "future": 1, "shape": 1, "nonfinite": 1, "too_large": 1,
                                     "bad_magic": 1, "unselected": 1, "duplicate": 1}, first["rejected"]
        assert [r["round"] for r in _completed(fed)] == [1, 2]
        log = aggregator.log.read_text()
        assert log.count("refused") >= 8 and "Traceback" not in log


def test_sigkill_mid_round_resumes_without_losing_or_repeating_a_round(tmp_path):
    agents = ["dev-1", "dev-2", "dev-3"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = _setup(fed, tmp_path, agents, rounds={"total": 6})
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: len(_completed(fed)) >= 3, 240, "three rounds", fed.processes.values())
        fed.kill("aggregator", signal.SIGKILL)
        before = _completed(fed)
        restarted = fed.start("aggregator-2", "aggregator", config)
        wait_for(lambda: restarted.popen.poll() is not None, 240, "the restarted aggregator to finish",
                 fed.processes.values(), poll=1)
        assert restarted.popen.returncode == 0, restarted.log_tail(40)
        history = _completed(fed)
        assert [r["round"] for r in history] == list(range(1, 7))
        assert history[: len(before)] == before  # completed rounds kept exactly
        assert f"resuming after round {len(before)}" in restarted.log.read_text()
        assert aggregator.popen.returncode == -signal.SIGKILL
