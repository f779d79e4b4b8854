"""Fault injection against a real federation: Mosquitto, the aggregator and agents as real processes.

Vanishing agents, an aggregator SIGKILLed mid-round, a broker restart mid-round, a gate closing during
training, a checkpoint directory that cannot take the next checkpoint, a disk filling up during an export,
the state directory remounted read-only, and a state whose every checkpoint is corrupt.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (
    FED,
    Tap,
    announcement,
    checkpoints_dir,
    chosen,
    completed,
    ghost,
    history,
    initial_model,
    start_federation,
    update_round,
    updates_for,
)

from fedlite.aggregator.checkpoint import ARRAYS_FILE, Checkpoint, checkpoint_name, load_latest, save_checkpoint
from fedlite.aggregator.cli import STORAGE_FAILURE
from fedlite.aggregator.export import export_complete, version_dir
from fedlite.demo.cluster import LocalFederation, Process, wait_for
from fedlite.protocol import topics
from fedlite.protocol.codec import decode
from fedlite.settings import dump_toml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


def _wait_exit(process: Process, timeout: float, others: list[Process]) -> int:
    wait_for(lambda: not process.alive(), timeout, f"{process.name} to exit", [process, *others], poll=0.5)
    return process.popen.returncode


def _record(fed: LocalFederation, number: int, timeout: float) -> dict:
    return wait_for(lambda: completed(fed, number), timeout, f"round {number} to complete", fed.processes.values())


def _set(config: Path, table: str, **values: object) -> None:
    """Change values of one table of a written configuration file."""
    tables = tomllib.loads(config.read_text())
    tables[table] |= values
    config.write_text(dump_toml(tables))


def _errors(process: Process) -> list[str]:
    return [line for line in process.log.read_text().splitlines() if " ERROR " in line]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator:
    """`mount(*options, target)` as root; every mount is undone after the test. Skips where mounting is not allowed."""
    done: list[Path] = []

    def run(*args: str) -> None:
        target = Path(args[-1])
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode != 0:
            if not done:
                pytest.skip(f"cannot mount here ({result.stderr.strip()}): needs root with CAP_SYS_ADMIN")
            raise RuntimeError(f"mount {' '.join(args)}: {result.stderr.strip()}")
        if target not in done:  # a remount changes a mount made before
            done.append(target)

    yield run
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], check=False)


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
        selected = chosen(announced.json(), agents)
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



# --- (f) the disk fills up during an export -------------------------------------------------------------


def _fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte (no reserve on tmpfs: root gets ENOSPC too)."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left"):
        (folder / "probe").write_bytes(b"x" * 65536)
    return filler


@pytest.mark.parametrize("when", ["mid_run", "final_round"])
def test_disk_full_during_an_export_stops_within_seconds_and_a_restart_redoes_the_export(tmp_path, model, mount,
                                                                                          when):
    """models/ on a small tmpfs filled to the last byte: the export's first write fails with ENOSPC (checkpoints
    live on another file system and keep working). mid_run: round 1's export fails while round 2 trains;
    final_round: the last round's export fails while the main thread waits for it before exiting."""
    agents = ["dev-1", "dev-2", "dev-3"]
    total, every, failing = (3, 1, 1) if when == "mid_run" else (2, 0, 2)
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        models = fed.run_dir / "aggregator" / "models"
        models.mkdir(parents=True)
        mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(models))
        config = start_federation(fed, tmp_path / "data", agents, model, rounds={"total": total})
        _set(config, "model", export_every=every)
        filler = _fill(models)
        aggregator = fed.start("aggregator", "aggregator", config)
        record = _record(fed, failing, 120)
        stop_line = f"export of round {failing} hit a storage failure: the aggregator stops"
        wait_for(lambda: stop_line in aggregator.log.read_text(), 120, "the export to fail", fed.processes.values(),
                 poll=0.05)
        noticed = time.time()
        others = [p for p in fed.processes.values() if p is not aggregator]
        assert _wait_exit(aggregator, 60, others) == STORAGE_FAILURE, aggregator.log_tail(40)
        exited = time.time()
        print(f"{when}: exit {exited - noticed:.1f} s after the failed export, "
              f"{exited - record['completed_at']:.1f} s after round {failing} completed (export included)")
        assert exited - noticed < 5.0  # not minutes in the exporter's queue
        log = aggregator.log.read_text()
        assert "Traceback" not in log
        (error,) = _errors(aggregator)
        assert (f"export of round {failing} failed: cannot write {version_dir(models, failing)}/train.tflite: "
                "No space left on device; not restarting until the storage is fixed") in error, error
        assert not export_complete(version_dir(models, failing))
        kept, runs = load_latest(checkpoints_dir(fed)), history(fed)
        assert kept is not None and kept.round == runs[-1]["round"] >= failing and kept.history == runs

        # room again: the restart re-exports the missed round from its checkpoint and completes the run
        filler.unlink()
        restarted = fed.start("aggregator-2", "aggregator", config)
        assert _wait_exit(restarted, 240, others) == 0, restarted.log_tail(40)
        redone = re.search(r"re-exporting rounds? ([\d, ]+): (its export is|their exports are) missing",
                           restarted.log.read_text())
        assert redone is not None, restarted.log_tail(40)
        assert int(redone.group(1).split(", ")[0]) == failing  # and any later round whose export was still queued
        assert [r["round"] for r in history(fed) if r["status"] == "complete"] == list(range(1, total + 1))
        expected = list(range(1, total + 1)) if every else [total]
        assert [n for n in range(1, total + 1) if export_complete(version_dir(models, n))] == expected
        metrics = json.loads((version_dir(models, failing) / "metrics.json").read_text())
        assert metrics == {"round": failing, "accuracy": record["accuracy"], "loss": record["loss"]}


# --- (g) the state directory is remounted read-only ----------------------------------------------------


def test_read_only_state_dir_stops_the_aggregator_within_seconds_with_one_error_line(tmp_path, model, mount):
    agents, silent = ["dev-1", "dev-2", "dev-3"], "dev-ghost"
    with LocalFederation(tmp_path / "run", FED, [*agents, silent]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"clients_per_round": 4, "quorum": 3, "deadline_seconds": 8.0})
        ghost(fed, silent)  # holds round 2 open: the remount hits the aggregator mid-round
        aggregator = fed.start("aggregator", "aggregator", config)
        state = fed.run_dir / "aggregator"
        _record(fed, 1, 90)
        good = load_latest(checkpoints_dir(fed))
        mount("--bind", str(state), str(state))
        mount("-o", "remount,bind,ro", str(state))
        remounted = time.time()
        with pytest.raises(OSError, match="Read-only file system"):
            (state / "probe").write_text("x")

        others = [p for p in fed.processes.values() if p is not aggregator]
        assert _wait_exit(aggregator, 30, others) == STORAGE_FAILURE, aggregator.log_tail(40)
        print(f"read-only: exit {time.time() - remounted:.1f} s after the remount")
        assert time.time() - remounted < 10.0
        log = aggregator.log.read_text()
        assert "Traceback" not in log, log[-3000:]
        (error,) = _errors(aggregator)
        assert f"cannot write {state}/" in error and "Read-only file system; not restarting" in error, error
        kept = load_latest(checkpoints_dir(fed))
        assert kept is not None and kept.round == good.round and kept.history == good.history

        # started again while still read-only: refused before any round, the same way
        again = fed.start("aggregator-2", "aggregator", config)
        assert _wait_exit(again, 60, others) == STORAGE_FAILURE, again.log_tail(40)
        assert "Traceback" not in again.log.read_text()
        (error,) = _errors(again)
        assert f"checkpoint directory {state}/checkpoints is not writable: Read-only file system" in error, error


# --- (h) every checkpoint is corrupt -------------------------------------------------------------------


def test_a_history_whose_checkpoints_are_all_corrupt_is_refused_unless_reset(tmp_path, model):
    agents = ["dev-1", "dev-2", "dev-3"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model, rounds={"total": 2})
        state, directory = fed.run_dir / "aggregator", checkpoints_dir(fed)
        # the state of a federation after round 6, whose three kept checkpoints were all damaged on disk
        weights = {"w": np.ones((4, 3), np.float32)}
        records = [{"round": r, "status": "complete", "accepted": 3} for r in range(1, 7)]
        for path in [save_checkpoint(directory, Checkpoint(r, weights, history=records[:r])) for r in (4, 5, 6)]:
            arrays = path / ARRAYS_FILE
            arrays.write_bytes(arrays.read_bytes()[:-8] + b"\xff" * 8)
        (state / "history.json").write_text(json.dumps(records))
        before = {p.name: (p / ARRAYS_FILE).read_bytes() for p in directory.iterdir()}

        refused = fed.start("aggregator", "aggregator", config)
        started = time.time()
        assert _wait_exit(refused, 60, list(fed.processes.values())) == STORAGE_FAILURE, refused.log_tail(40)
        print(f"refusal: exit {time.time() - started:.1f} s after start")
        log = refused.log.read_text()
        assert "Traceback" not in log and "round 1: selected" not in log
        (error,) = _errors(refused)
        assert (f"no valid checkpoint in {directory}, but the checkpoints of rounds 4, 5, 6 fail to verify and "
                f"{state}/history.json records 6 completed rounds (last: 6): refusing to start the federation over "
                "at round 1") in error and "--reset" in error, error
        assert {p.name: (p / ARRAYS_FILE).read_bytes() for p in directory.iterdir()} == before  # nothing touched
        assert [r["round"] for r in history(fed)] == list(range(1, 7))

        command = [sys.executable, "-m", "fedlite.cli", "aggregator", "--config", str(config), "--reset"]
        reset = fed.start_command("aggregator-reset", command)
        assert _wait_exit(reset, 240, list(fed.processes.values())) == 0, reset.log_tail(40)
        log = reset.log.read_text()
        (aside,) = [p for p in state.iterdir() if p.name.startswith("previous-")]
        assert f"--reset: moved the previous state (checkpoints, history.json) to {aside}" in log, log[-3000:]
        assert [(r["round"], r["status"]) for r in history(fed)] == [(1, "complete"), (2, "complete")]
        assert sorted(p.name for p in directory.iterdir()) == [checkpoint_name(1), checkpoint_name(2)]
        assert load_latest(directory).round == 2
        assert {p.name: (p / ARRAYS_FILE).read_bytes() for p in (aside / "checkpoints").iterdir()} == before
        assert [r["round"] for r in json.loads((aside / "history.json").read_text())] == list(range(1, 7))
