"""Round lifecycle, presence, self-healing retained topics and consecutive runs, with real processes."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import Session, open_client
from federation_helpers import (
    FED,
    Seen,
    Tap,
    announcement,
    chosen,
    completed,
    history,
    initial_model,
    start_federation,
    update_round,
    updates_for,
    write_shards,
)

from fedlite.agent import watermark
from fedlite.aggregator.fleet import Fleet
from fedlite.demo.cluster import AGGREGATOR_USER, LocalFederation, wait_for
from fedlite.protocol import topics
from fedlite.protocol.messages import DeviceReport, DeviceStatus, RoundAnnouncement, to_json
from fedlite.protocol.selection import choose, is_selected
from fedlite.protocol.signing import Verifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


def _device(fed: LocalFederation, name: str) -> Session:
    """A raw MQTT connection with a device's own credentials (what that device, or its owner, can send)."""
    b = fed.broker
    return open_client(b.tls_host, b.tls_port, name, fed.passwords[name], ca_file=b.ca_file)


def _status(name: str, state: str = "online", at: float | None = None) -> bytes:
    return to_json(DeviceStatus(client_id=name, state=state, eligible=state == "online", num_examples=100,
                                updated_at=time.time() if at is None else at))


def _retained(fed: LocalFederation, topic: str) -> bytes:
    """What the broker holds retained on `topic` now, as a new subscriber gets it."""
    b = fed.broker
    reader = open_client(b.host, b.port, AGGREGATOR_USER, fed.passwords[AGGREGATOR_USER],
                         client_id=f"reader-{time.monotonic_ns()}")
    try:
        reader.subscribe(topic)
        return bytes(reader.next_message(10).payload)
    finally:
        reader.close()


def _round_topic_now(fed: LocalFederation) -> dict[str, Any]:
    topic = topics.round_topic(FED)
    verifier = Verifier.from_files([str(fed.signing_key.with_suffix(".pub"))])
    return json.loads(verifier.verify(topic, _retained(fed, topic)))


def _announcements(tap: Tap, state: str = "open") -> list[Seen]:
    tap.poll()
    return [m for m in tap.seen if m.kind == "round" and m.payload and m.json()["state"] == state]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _repairs(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fedlite_retained_repairs_total{"))


# --- 1. round lifecycle ---------------------------------------------------------------------------------


def test_a_device_connecting_between_rounds_sees_closed_and_waits_and_a_late_report_is_refused(tmp_path, model):
    agents, away = ["dev-1", "dev-2"], "dev-3"
    with LocalFederation(tmp_path / "run", FED, [*agents, away]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 2, "clients_per_round": 2, "over_selection": 0.5, "quorum": 2,
                                          "deadline_seconds": 90.0, "wait_for_devices_seconds": 6.0})
        away_config = fed.agent_config(away, write_shards(tmp_path / "away", [away])[away],
                                       agent={"status_interval_seconds": 0.5})
        device = _device(fed, away)  # dev-3's last status before it went away: online and eligible
        device.publish(topics.status_topic(FED, away), _status(away), retain=True)
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        opened = tap.wait(announcement(1), 120, "round 1", fed.processes.values()).json()
        assert chosen(opened, [*agents, away]) == [*agents, away]
        device.publish(topics.status_topic(FED, away), _status(away, "offline"), retain=True)

        # round 1 closes on its quorum: the round topic says so, for the same run, epoch, round and session
        closed = tap.wait(announcement(1, "closed"), 90, "round 1 closed", fed.processes.values()).json()
        assert {k: closed[k] for k in ("run", "epoch", "round", "session")} == \
            {k: opened[k] for k in ("run", "epoch", "round", "session")}
        assert (closed["accepted"], closed["reason"]) == (2, "quorum")
        assert closed["issued_at"] > opened["issued_at"]
        assert _round_topic_now(fed) == closed  # retained, signed: what a device connecting now gets
        fed.set_device_state("dev-2", cpu_percent=95.0)  # busy from now on: round 2 waits for dev-3

        # dev-3's answer to round 1 arrives after the close: refused as late, and filed under round 1
        device.publish(topics.report_topic(FED, away), to_json(DeviceReport(
            client_id=away, round=1, kind="declined", reason="idle: busy", sent_at=time.time(), run=opened["run"],
            session=opened["session"])))
        wait_for(lambda: "round 1: report refused (late)" in aggregator.log.read_text(), 30, "the late report",
                 fed.processes.values())
        device.close()

        # dev-3 comes back between the rounds: it sees `closed`, neither trains round 1 nor waits for its weights
        assert max(m.json()["round"] for m in _announcements(tap)) == 1  # round 2 waits for a second device
        back = fed.start(away, "agent", away_config)
        second = tap.wait(announcement(2), 60, "round 2", fed.processes.values())
        assert is_selected(second.json(), "dev-1") and is_selected(second.json(), away)  # the two eligible
        sent = tap.wait(lambda m: m.kind == "updates" and m.client == away, 60, "dev-3's update",
                        fed.processes.values())
        assert update_round(sent) == 2 and sent.at - second.at < 20, (sent.at - second.at)
        wait_for(lambda: aggregator.popen.poll() is not None, 120, "the run to end", fed.processes.values())
        assert aggregator.popen.returncode == 0, aggregator.log_tail(30)
        log = back.log.read_text()
        assert "round 1" not in log and "did not arrive" not in log, log
        tap.poll()
        assert updates_for(tap.seen, 1) == {a: 1 for a in agents}
        reports = [m.json() for m in tap.seen if m.kind == "reports"]
        assert [r["client_id"] for r in reports if r["round"] == 1] == [away]  # the late one only
        # (busy dev-2 may fall under round 2's threshold and decline: it was not in the aggregator's selection,
        # so its report is not counted, as the record's `declined` shows)
        records = history(fed)
        assert [(r["round"], r["status"], r["accepted"]) for r in records] == [(1, "complete", 2), (2, "complete", 2)]
        assert records[0]["declined"] == 0  # dev-3's late decline was not counted into round 1 (nor into round 2:
        # there only busy dev-2 may decline, if its last status still said eligible when round 2 was drawn)
        assert sum(r["refusals"].get("report", {}).get("late", 0) for r in records) == 1
        assert [r["close_reason"] for r in records] == ["quorum", "quorum"]
        done = _round_topic_now(fed)
        assert done["state"] == "done" and done["round"] == 2
        assert (done["session"], done["accepted"], done["reason"]) == (second.json()["session"], 2, "quorum")


# --- 2. presence ----------------------------------------------------------------------------------------


def test_an_agent_stopped_with_sigterm_goes_offline_and_a_stale_retained_status_is_not_selected(tmp_path, model):
    agents, stopped, gone = ["dev-1", "dev-2", "dev-3"], "dev-3", "dev-4"
    ttl = 8.0
    with LocalFederation(tmp_path / "run", FED, [*agents, gone]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 6, "clients_per_round": 2, "over_selection": 0.5, "quorum": 2,
                                          "status_ttl_seconds": ttl, "wait_for_devices_seconds": 2.0})
        for agent in agents:  # a round lasts some 0.8 s of simulated training: round 3 is still open when killed
            fed.set_device_state(agent, batch_seconds=0.02)
        tap = Tap(fed)
        fed.start("aggregator", "aggregator", config)
        assert is_selected(tap.wait(announcement(1), 120, "round 1", fed.processes.values()).json(), stopped)
        wait_for(lambda: completed(fed, 1), 60, "round 1", fed.processes.values())

        # a clean stop says so: the retained status is `offline`, and the device is never selected again
        fed.kill(stopped, signal.SIGTERM)
        assert fed.processes[stopped].popen.returncode == 0
        offline = tap.wait(lambda m: m.kind == "status" and m.client == stopped and m.json()["state"] == "offline",
                           10, "the offline status")
        assert json.loads(_retained(fed, topics.status_topic(FED, stopped)))["state"] == "offline"

        # another device's retained status says online; then the aggregator is down for longer than the window
        tap.wait(announcement(3), 120, "round 3", fed.processes.values())
        fed.kill("aggregator")
        device = _device(fed, gone)
        device.publish(topics.status_topic(FED, gone), _status(gone), retain=True)
        device.close()  # no last will: the broker keeps `online` for dev-4
        time.sleep(ttl + 2)
        restarted = fed.start("aggregator-2", "aggregator", config)
        wait_for(lambda: restarted.popen.poll() is not None, 180, "the restarted run to end", fed.processes.values())
        assert restarted.popen.returncode == 0, restarted.log_tail(30)
        assert "resuming after round" in restarted.log.read_text()

        # selected by the aggregator: only the two live devices (a device outside its eligible view may still
        # fall under a round's threshold, but its update would be refused as unselected)
        after_stop = [r for r in history(fed) if r["started_at"] > offline.at + 1]
        assert after_stop and all(r["selected"] == 2 for r in after_stop), [r["selected"] for r in after_stop]
        assert [r["round"] for r in history(fed) if r["status"] == "complete"] == [1, 2, 3, 4, 5, 6]
        devices = {d["client_id"]: d for d in json.loads((fed.run_dir / "aggregator" / "fleet.json").read_text())
                   ["devices"]}
        assert devices[gone]["state"] == "online" and devices[gone]["stale"]  # what the dashboard greys out
        assert devices[stopped]["state"] == "offline"
        assert not devices["dev-1"]["stale"] and devices["dev-1"]["last_seen"] <= devices["dev-1"]["received_at"]


# --- 3. self-healing retained topics ---------------------------------------------------------------------


def test_a_retained_model_overwritten_with_genuine_bytes_is_repaired_and_a_new_device_trains(tmp_path, model):
    agents, newcomer = ["dev-1", "dev-2"], "dev-3"
    prometheus = _free_port()
    with LocalFederation(tmp_path / "run", FED, [*agents, newcomer]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 8, "clients_per_round": 3, "quorum": 2,
                                          "wait_for_devices_seconds": 2.0},
                                  metrics={"prometheus_port": prometheus})
        newcomer_config = fed.agent_config(newcomer, write_shards(tmp_path / "new", [newcomer])[newcomer],
                                           agent={"status_interval_seconds": 0.5})
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        tap.wait(announcement(2), 120, "round 2", fed.processes.values())
        model_frame = tap.wait(lambda m: m.kind == "model" and m.raw, 10, "the model frame")
        weights = tap.wait(lambda m: m.kind == "weights" and m.raw, 10, "a weights frame")
        before = _repairs(prometheus)

        # anyone with the aggregator's broker password could move genuine signed bytes onto the model topic
        tap.session.publish(model_frame.topic, weights.raw, retain=True)
        wait_for(lambda: _repairs(prometheus) > before, 30, "the repair", fed.processes.values())
        assert _repairs(prometheus) == before + 1
        assert _retained(fed, model_frame.topic) == model_frame.raw
        assert "that this aggregator did not send: re-publishing its own" in aggregator.log.read_text()

        fed.start(newcomer, "agent", newcomer_config)
        online = tap.wait(lambda m: m.kind == "status" and m.client == newcomer and m.json()["eligible"], 60,
                          "dev-3 online", fed.processes.values())
        # rounds take a tenth of a second here: the first one that selects it after it came online
        joined = tap.wait(lambda m: m.kind == "round" and bool(m.payload) and m.json()["state"] == "open"
                          and m.json()["issued_at"] > online.at and is_selected(m.json(), newcomer), 60,
                          "a round that selects dev-3", fed.processes.values())
        number = joined.json()["round"]
        wait_for(lambda: completed(fed, number), 90, f"round {number}", fed.processes.values())
        assert completed(fed, number)["accepted"] == 3
        tap.poll()
        assert updates_for(tap.seen, number)[newcomer] == 1
        wait_for(lambda: aggregator.popen.poll() is not None, 120, "the run to end", fed.processes.values())
        assert aggregator.popen.returncode == 0, aggregator.log_tail(30)
        assert "signature" not in fed.processes[newcomer].log.read_text().lower()


# --- 4. two runs on one broker ---------------------------------------------------------------------------


def test_a_second_run_on_the_same_broker_is_followed_by_the_agents_of_the_first(tmp_path, model):
    agents = ["dev-1", "dev-2", "dev-3"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config_a = start_federation(fed, tmp_path / "data", agents, model, rounds={"total": 3})
        tap = Tap(fed)
        run_a = fed.start("aggregator-a", "aggregator", config_a)
        wait_for(lambda: run_a.popen.poll() is not None, 180, "run A", fed.processes.values())
        assert run_a.popen.returncode == 0, run_a.log_tail(30)
        first = _round_topic_now(fed)
        assert (first["state"], first["round"]) == ("done", 3)

        state_b = fed.run_dir / "aggregator-b"
        shutil.copytree(model, state_b / "models" / model.name)
        tables = tomllib.loads(config_a.read_text())
        config_b = fed.aggregator_config(federation={"state_dir": str(state_b)},
                                         **{t: tables[t] for t in ("model", "rounds", "training", "evaluation")})
        run_b = fed.start("aggregator-b", "aggregator", config_b)
        wait_for(lambda: run_b.popen.poll() is not None, 180, "run B", fed.processes.values())
        assert run_b.popen.returncode == 0, run_b.log_tail(30)

        records = json.loads((state_b / "history.json").read_text())
        assert [(r["round"], r["status"], r["accepted"]) for r in records] == [(n, "complete", 3) for n in (1, 2, 3)]
        last = _round_topic_now(fed)
        assert (last["state"], last["round"]) == ("done", 3) and last["run"] != first["run"]
        assert last["run_started_at"] > first["run_started_at"]
        tap.poll()
        runs = {m.json()["run"] for m in tap.seen if m.kind == "round" and m.payload}
        assert runs == {first["run"], last["run"]}
        for agent in agents:
            progress = json.loads((fed.run_dir / "agents" / agent / "state" / "progress.json").read_text())
            assert progress["run"] == last["run"]
            assert "stale_run" not in fed.processes[agent].log.read_text()


# --- the rules the tests above rest on ------------------------------------------------------------------


def _open(session: str = "s1", round_number: int = 1, issued_at: float = 10.0) -> RoundAnnouncement:
    return RoundAnnouncement(federation=FED, round=round_number, model_hash="h", model_topic="m",
                             weights_topic="w", selection=choose(["a"], 1, "00" * 16)[1], deadline=100.0,
                             session=session, issued_at=issued_at, run="r", run_started_at=1.0, epoch=1)


def test_a_closed_announcement_ends_its_session_and_is_not_replayable() -> None:
    opened = _open()
    mark = watermark.advance(watermark.Watermark(), opened)
    assert not watermark.superseded(mark, opened)
    closed = RoundAnnouncement(**{**opened.__dict__, "state": "closed", "accepted": 1, "reason": "quorum",
                                  "issued_at": 11.0})
    assert watermark.judge(mark, closed) is None
    mark = watermark.advance(mark, closed)
    assert watermark.superseded(mark, opened)  # training for s1 stops
    assert watermark.judge(mark, opened) == "replayed"  # older than the mark: however it is delivered
    assert watermark.judge(mark, closed) is None  # the same again (a reconnect, a repair): harmless, followed
    retry = _open("s2", issued_at=12.0)  # the same round again, a new session
    assert watermark.judge(mark, retry) is None
    mark = watermark.advance(mark, retry)
    assert not watermark.superseded(mark, retry) and watermark.superseded(mark, opened)


def test_fleet_freshness_comes_from_the_status_itself_bounded_by_its_arrival() -> None:
    fleet = Fleet(status_ttl_seconds=10.0)
    now = 1000.0
    fleet.update(DeviceStatus(client_id="retained", state="online", eligible=True, updated_at=now - 60), now)
    fleet.update(DeviceStatus(client_id="live", state="online", eligible=True, updated_at=now - 1), now)
    fleet.update(DeviceStatus(client_id="ahead", state="online", eligible=True, updated_at=now + 3600), now)
    fleet.update(DeviceStatus(client_id="stopped", state="offline", updated_at=now), now)
    assert fleet.eligible(now) == ["ahead", "live"]
    assert fleet.eligible(now + 10.5) == []  # a clock an hour ahead is fresh only from when it arrived
    assert fleet.counts(now) == {"known": 4, "online": 2, "eligible": 2, "training": 0}
