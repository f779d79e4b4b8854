"""Fault injection against a real federation: Mosquitto, the aggregator and agents as real processes.

Vanishing agents, an aggregator SIGKILLed mid-round, a broker restart mid-round, a gate closing during
training, and a checkpoint directory that cannot take the next checkpoint.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (
    FED,
    Tap,
    announcement,
    checkpoints_dir,
    completed,
    ghost,
    history,
    initial_model,
    start_federation,
    update_round,
    updates_for,
)

from fedlite.aggregator.checkpoint import ARRAYS_FILE, checkpoint_name, load_latest
from fedlite.aggregator.cli import STORAGE_FAILURE
from fedlite.demo.cluster import LocalFederation, Process, wait_for
from fedlite.protocol import topics
from fedlite.protocol.codec import decode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


def _wait_exit(process: Process, timeout: float, others: list[Process]) -> int:
    wait_for(lambda: not process.alive(), timeout, f"{process.name} to exit", [process, *others], poll=0.5)
    return process.popen.returncode


def _record(fed: LocalFederation, number: int, timeout: float) -> dict:
    return wait_for(lambda: completed(fed, number), timeout, f"round {number} to complete", fed.processes.values())


# --- (a) agents vanish mid-round ------------------------------------------------------------------------


def test_thirty_percent_of_selected_agents_vanish_and_the_round_completes_at_its_deadline(tmp_path, model):
    agents = [f"dev-{i:02d}" for i in range(10)]
    deadline, quorum = 10.0, 6
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        # a plan with some work in it (~0.3 s of CPU per agent): the kill wins by a wide margin even under load
        config = start_federation(fed, tmp_path / "data", agents, model, training={"epochs": 20, "batch_size": 1},
                                  rounds={"quorum": quorum, "deadline_seconds": deadline})
        tap = Tap(fed)
        fed.start("aggregator", "aggregator", config)
        announced = tap.wait(announcement(1), 120, "round 1", fed.processes.values())
        selected = announced.json()["selected"]
        victims = selected[: round(0.3 * len(selected))]
        for victim in victims:  # the moment the round that selected them is announced: all at once, then reap
            os.killpg(fed.processes[victim].popen.pid, signal.SIGKILL)
        killed_after = time.time() - announced.at
        for victim in victims:
            fed.kill(victim, signal.SIGKILL)

        record = _record(fed, 1, 60)
        tap.poll()
        first_answer = min(m.at for m in tap.seen if update_round(m) == 1) - announced.at
        # they vanished before any selected agent could have answered
        assert killed_after < first_answer, f"killed after {killed_after:.3f} s, first update at {first_answer:.3f} s"
        assert len(selected) == 10 and len(victims) == 3, selected
        assert record["status"] == "complete" and record["accepted"] >= quorum
        assert record["timed_out"] >= len(victims)
        assert set(record["update_norms"]) == set(selected) - set(victims)  # every survivor counted, no victim
        assert record["duration_seconds"] >= deadline - 0.5  # it waited for them until the deadline, then closed
        assert not set(updates_for(tap.seen, 1)) & set(victims)  # nothing left a killed agent
        assert all(fed.processes[v].popen.returncode == -signal.SIGKILL for v in victims)


# --- (b) the aggregator is SIGKILLed mid-round ----------------------------------------------------------


def test_aggregator_sigkill_mid_round_reruns_the_round_from_the_checkpoint_with_a_new_session(tmp_path, model):
    agents, silent = ["dev-1", "dev-2", "dev-3"], "dev-ghost"
    with LocalFederation(tmp_path / "run", FED, [*agents, silent]) as fed:
        # the ghost is selected too and never answers: each round stays open until its deadline
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"clients_per_round": 4, "quorum": 3, "deadline_seconds": 6.0})
        tap = Tap(fed)
        ghost(fed, silent)
        fed.start("aggregator", "aggregator", config)
        interrupted = tap.wait(announcement(2), 90, "round 2", fed.processes.values())
        tap.wait_until(lambda: set(updates_for(tap.seen, 2)) >= set(agents), 30, "every agent's round 2 update",
                       fed.processes.values())
        fed.kill("aggregator", signal.SIGKILL)  # the round is open until the ghost's deadline
        before = history(fed)
        checkpoint = load_latest(checkpoints_dir(fed))
        assert checkpoint is not None and checkpoint.round == 1
        assert [(r["round"], r["status"]) for r in before] == [(1, "complete")]

        mark = len(tap.seen)
        restarted = fed.start("aggregator-2", "aggregator", config)
        rerun = tap.wait(announcement(2), 60, "the re-run of round 2", fed.processes.values(), since=mark)
        weights = tap.wait(lambda m: m.topic == topics.weights_topic(FED, 2) and bool(m.payload), 30,
                           "the re-run's weights", fed.processes.values(), since=mark)
        record = _record(fed, 2, 60)
        tap.poll()

        # the resumed model is exactly the checkpoint's (float32 downlink: bit for bit)
        sent = decode(weights.payload).tensors
        assert set(sent) == set(checkpoint.weights)
        assert all(np.array_equal(sent[name], checkpoint.weights[name]) for name in sent)
        # a new session for the same round, and the agents that had already answered it answer again
        assert rerun.json()["session"] != interrupted.json()["session"]
        assert record["session"] == rerun.json()["session"]
        assert set(record["update_norms"]) == set(agents)
        assert updates_for(tap.seen[mark:], 2) == dict.fromkeys(agents, 1)
        for agent in agents:
            assert fed.processes[agent].log.read_text().count("round 2: sent update") == 2
        assert history(fed)[0] == before[0]  # the completed round is kept exactly, not repeated
        assert "resuming after round 1" in restarted.log.read_text()


# --- (c) the broker restarts mid-round ------------------------------------------------------------------


def test_broker_restart_mid_round_everyone_reconnects_and_the_run_finishes(tmp_path, model):
    agents = ["dev-1", "dev-2", "dev-3"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model, rounds={"total": 2})
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        tap.wait(announcement(1), 90, "round 1", fed.processes.values())
        old_pid = fed.broker.pid
        restarted_at = time.time()
        fed.broker.restart()  # persistence on: retained messages and sessions survive
        assert fed.broker.pid != old_pid

        others = [p for p in fed.processes.values() if p is not aggregator]
        assert _wait_exit(aggregator, 180, others) == 0, aggregator.log_tail(40)
        tap.wait(announcement(2, state="done"), 30, "the done announcement")
        runs = history(fed)
        assert [(r["round"], r["status"], r["accepted"]) for r in runs] == [(1, "complete", 3), (2, "complete", 3)]
        assert runs[0]["started_at"] < restarted_at < runs[0]["completed_at"]  # the restart was mid-round
        assert "disconnected from broker" in aggregator.log.read_text()
        for agent in agents:
            log = fed.processes[agent].log.read_text()
            assert "disconnected from broker" in log and log.count("sent update") == 2, log[-2000:]
        assert updates_for(tap.seen, 1).keys() == set(agents)  # the tap's persistent session lost nothing


# --- (d) a gate closes during training ------------------------------------------------------------------


def test_agent_losing_its_charger_mid_training_aborts_without_a_partial_update(tmp_path, model):
    agents, victim = ["dev-1", "dev-2", "dev-3"], "dev-3"
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        # the plan asks for endless training; the others cap it at 2 epochs, the victim trains until stopped
        caps = {a: {"agent": {"status_interval_seconds": 0.5, "max_epochs": 100_000 if a == victim else 2}}
                for a in agents}
        config = start_federation(fed, tmp_path / "data", agents, model, agent_tables=caps,
                                  rounds={"quorum": 2, "deadline_seconds": 60.0}, training={"epochs": 100_000})
        tap = Tap(fed)
        fed.start("aggregator", "aggregator", config)
        tap.wait(lambda m: m.kind == "status" and m.client == victim and m.json()["state"] == "training", 90,
                 f"{victim} to train", fed.processes.values())
        fed.set_device_state(victim, plugged_in=False, battery_percent=90.0)
        record = _record(fed, 1, 30)
        tap.poll()

        assert record["accepted"] == 2 and record["aborted"] == 1 and record["timed_out"] == 0
        assert victim not in record["update_norms"] and record["rejected"] == {}
        assert record["duration_seconds"] < 30  # closed as soon as the abort came, not at the deadline
        reports = [m.json() for m in tap.seen if m.kind == "reports" and m.client == victim]
        assert [(r["round"], r["kind"]) for r in reports] == [(1, "aborted")]
        assert reports[0]["reason"].startswith("charged: on battery") and "(after " in reports[0]["reason"]
        assert "round 1 aborted: charged: on battery" in fed.processes[victim].log.read_text()
        assert victim not in updates_for(tap.seen, 1)
        assert not [m for m in tap.seen if m.kind == "updates" and m.client == victim]  # no partial update at all


# --- (e) the checkpoint directory cannot take the next checkpoint ----------------------------------------


def test_unwritable_checkpoint_stops_the_aggregator_with_a_clear_error_and_keeps_the_last_good_one(tmp_path, model):
    agents, silent = ["dev-1", "dev-2", "dev-3"], "dev-ghost"
    with LocalFederation(tmp_path / "run", FED, [*agents, silent]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"clients_per_round": 4, "quorum": 3, "deadline_seconds": 5.0})
        ghost(fed, silent)
        aggregator = fed.start("aggregator", "aggregator", config)
        directory = checkpoints_dir(fed)
        first = directory / checkpoint_name(1)
        wait_for(lambda: completed(fed, 1), 90, "round 1", fed.processes.values())
        good = load_latest(directory)
        assert good is not None and good.round == 1

        # "disk full" that root cannot bypass: a file size limit on the running aggregator (EFBIG, and
        # Python ignores SIGXFSZ) above its log's size but below the size of a checkpoint's arrays file
        limit = aggregator.log.stat().st_size + 8192
        assert limit < (first / ARRAYS_FILE).stat().st_size
        resource.prlimit(aggregator.popen.pid, resource.RLIMIT_FSIZE, (limit, limit))
        assert completed(fed, 2) is None  # round 2 is still open (the ghost holds it to its deadline)

        others = [p for p in fed.processes.values() if p is not aggregator]
        assert _wait_exit(aggregator, 60, others) == STORAGE_FAILURE  # the unit does not restart on this code
        log = aggregator.log.read_text()
        assert f"cannot write the round 2 checkpoint into {directory}: File too large" in log, log[-2000:]
        assert "Traceback" not in log
        assert sorted(p.name for p in directory.iterdir()) == [checkpoint_name(1)]  # no partial or temp dir
        kept = load_latest(directory)
        assert kept is not None and kept.round == 1 and kept.history == good.history
        assert all(np.array_equal(kept.weights[k], good.weights[k]) for k in good.weights)
        assert [r["round"] for r in history(fed)] == [1]  # history.json did not run ahead of the checkpoint

        # with room again, a restart resumes from that checkpoint and completes the round that failed
        restarted = fed.start("aggregator-2", "aggregator", config)
        record = _record(fed, 2, 60)
        assert record["accepted"] == 3 and load_latest(directory).round >= 2
        assert "resuming after round 1" in restarted.log.read_text()

