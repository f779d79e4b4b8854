"""Hardening against single faults and one hostile device, with a real Mosquitto and real processes.

Decompression bombs at a round's start, a broker killed with SIGKILL after the model was published, a restart
from an older checkpoint after the agents saw later rounds, a replayed genuine announcement, and a server
step that would commit exploded weights.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import zstandard
from broker_fixtures import open_client
from federation_helpers import (
    FED,
    Tap,
    announcement,
    checkpoints_dir,
    completed,
    history,
    initial_model,
    start_federation,
    update_round,
)

from fedlite.aggregator.checkpoint import ARRAYS_FILE, checkpoint_name
from fedlite.demo.cluster import LocalFederation, wait_for
from fedlite.protocol import PROTOCOL_VERSION, codecs, topics
from fedlite.protocol.codec import FLAG_ZSTD, MAGIC
from fedlite.protocol.messages import DeviceStatus, to_json
from fedlite.protocol.selection import is_selected

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _bombs() -> list[bytes]:
    """Frames of a few kB that expand to 255 MiB: five that declare their size, five that stream."""
    zeros = bytes(255 * 1024 * 1024)
    declared = zstandard.ZstdCompressor(level=19).compress(zeros)
    streamed = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(zeros)
    prefix = MAGIC + bytes([PROTOCOL_VERSION, FLAG_ZSTD])
    return [prefix + declared] * 5 + [prefix + streamed] * 5


def test_ten_decompression_bombs_cost_the_aggregator_nothing_and_the_round_completes(tmp_path, model):
    agents = ["dev-1", "dev-2", "dev-3"]
    bombs = _bombs()
    assert max(len(b) for b in bombs) < 16 * 1024
    with LocalFederation(tmp_path / "run", FED, [*agents, "evil", "asleep"]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,  # 2 rounds: no TF export in round 1
                                  rounds={"total": 2, "clients_per_round": 3, "over_selection": 0.34})
        b = fed.broker
        evil = open_client(b.tls_host, b.tls_port, "evil", fed.passwords["evil"], client_id="evil", ca_file=b.ca_file)
        evil.publish(topics.status_topic(FED, "evil"),
                     to_json(DeviceStatus(client_id="evil", state="online", eligible=True, num_examples=100,
                                          updated_at=time.time(), encodings=list(codecs.UPLINK))), retain=True)
        # a known device that is not eligible: round 1 waits wait_for_devices_seconds for it (over-selection wants
        # 5), so the aggregator has settled (its start-up allocations done) when the RSS baseline is read
        asleep = open_client(b.tls_host, b.tls_port, "asleep", fed.passwords["asleep"], client_id="asleep",
                             ca_file=b.ca_file)
        asleep.publish(topics.status_topic(FED, "asleep"),
                       to_json(DeviceStatus(client_id="asleep", state="online", eligible=False,
                                            updated_at=time.time(), encodings=list(codecs.UPLINK))), retain=True)
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        announced = tap.wait(announcement(1), 120, "round 1", fed.processes.values()).json()
        assert is_selected(announced, "evil")
        before = _rss_kib(aggregator.popen.pid)
        for bomb in bombs:  # at the round's start, before the honest updates
            evil.publish(topics.update_topic(FED, "evil"), bomb)
        record = wait_for(lambda: completed(fed, 1), 120, "round 1", fed.processes.values())
        growth_mib = (_rss_kib(aggregator.popen.pid) - before) / 1024
        print(f"aggregator RSS growth while refusing 10 bombs of 255 MiB each: {growth_mib:.1f} MiB")
        assert record["accepted"] == 3 and record["rejected"] == {"too_large": 10}, record
        assert record["refusals"]["update"]["too_large"] == 10
        assert growth_mib < 40, growth_mib  # one bomb fully expanded would be 255 MiB


def test_broker_killed_after_the_model_is_published_loses_nothing_a_new_device_needs(tmp_path, model):
    agents, newcomer = ["dev-1", "dev-2"], "dev-3"
    with LocalFederation(tmp_path / "run", FED, [*agents, newcomer]) as fed:
        config = start_federation(fed, tmp_path / "data", [*agents, newcomer], model,
                                  rounds={"total": 4, "clients_per_round": 2})
        fed.kill(newcomer)  # enrolled and configured, started only after the broker lost its memory
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        tap.wait(announcement(1), 120, "round 1", fed.processes.values())
        process = fed.broker._process
        process.kill()  # SIGKILL: no database save; the retained model was published seconds ago
        process.wait()
        fed.broker._process = None
        fed.broker.start()
        fed.start(newcomer, "agent", fed.run_dir / "agents" / newcomer / "agent.toml")
        wait_for(lambda: "sent update" in fed.processes[newcomer].log.read_text(), 180,
                 f"{newcomer} to train a round", fed.processes.values())
        wait_for(lambda: aggregator.popen.poll() is not None, 180, "the run to finish", fed.processes.values())
        assert aggregator.popen.returncode == 0, aggregator.log_tail(30)
        assert "re-asserted" in aggregator.log.read_text()
        for agent in [*agents, newcomer]:  # a cleared retained topic is not an unsigned broadcast
            assert "signature" not in fed.processes[agent].log.read_text().lower()


def test_a_restart_from_an_older_checkpoint_is_followed_by_agents_that_saw_later_rounds(tmp_path, model):
    agents = ["dev-1", "dev-2"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model, rounds={"total": 5, "clients_per_round": 2})
        tap = Tap(fed)
        fed.start("aggregator", "aggregator", config)
        tap.wait(announcement(4), 240, "round 4", fed.processes.values())
        fed.kill("aggregator", signal.SIGKILL)  # the agents have seen round 4
        newest = checkpoints_dir(fed) / checkpoint_name(3)
        (newest / ARRAYS_FILE).write_bytes(b"corrupt")
        restarted = fed.start("aggregator-2", "aggregator", config)
        wait_for(lambda: restarted.popen.poll() is not None, 240, "the restarted aggregator to finish",
                 fed.processes.values(), poll=1)
        assert restarted.popen.returncode == 0, restarted.log_tail(40)
        assert "resuming after round 2" in restarted.log.read_text()
        records = [r for r in history(fed) if r["status"] == "complete"]
        assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
        assert all(r["accepted"] == 2 for r in records)
        tap.poll()
        rounds = [json.loads(m.payload) for m in tap.seen if m.kind == "round" and m.payload]
        epochs = {(a["epoch"], a["round"]) for a in rounds}
        assert (1, 4) in epochs and (2, 3) in epochs  # round 3 again, in the new epoch, below what agents saw


def test_a_replayed_genuine_announcement_is_refused_and_not_trained(tmp_path, model):
    agents = ["dev-1", "dev-2"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 3, "clients_per_round": 2, "deadline_seconds": 60.0})
        tap = Tap(fed)
        fed.start("aggregator", "aggregator", config)
        first = tap.wait(announcement(1), 120, "round 1", fed.processes.values())
        weights = tap.wait(lambda m: m.kind == "weights" and m.topic.endswith("/1") and m.raw, 60, "round 1 weights")
        tap.wait(announcement(2), 120, "round 2", fed.processes.values())
        # anyone holding the aggregator's broker password could re-publish the genuine signed bytes
        tap.session.publish(weights.topic, weights.raw, retain=True)
        tap.session.publish(first.topic, first.raw, retain=False)
        wait_for(lambda: all("replayed" in fed.processes[a].log.read_text() for a in agents), 60,
                 "the agents to refuse the replay", fed.processes.values())
        tap.wait(announcement(3, state="done"), 180, "the end of the run", fed.processes.values())
        tap.poll()
        assert sum(1 for m in tap.seen if update_round(m) == 1) == len(agents)  # round 1 trained once each


def test_weights_that_explode_are_never_committed(tmp_path, model):
    agents = ["dev-1", "dev-2"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 2, "clients_per_round": 2, "max_attempts": 2},
                                  server={"learning_rate": 1e6})
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: aggregator.popen.poll() is not None, 240, "the aggregator to stop", fed.processes.values())
        assert aggregator.popen.returncode == 1
        records = history(fed)
        assert [r["status"] for r in records] == ["failed", "failed"], records
        assert "exceeds" in records[0]["reason"]
        assert not list(checkpoints_dir(fed).glob("round-*"))  # the initial model stays current
        assert "Traceback" not in aggregator.log.read_text()
