"""Compact selection with real processes: exactly `want` of more eligible devices train, nobody else is admitted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from broker_fixtures import open_client
from federation_helpers import (
    FED,
    Tap,
    announcement,
    chosen,
    completed,
    initial_model,
    start_federation,
    updates_for,
)

from fedlite.demo.cluster import LocalFederation, wait_for
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, encode_update

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


def test_a_round_selects_exactly_want_of_more_eligible_devices_and_only_they_train(tmp_path, model):
    agents = [f"dev-{i}" for i in range(5)]
    outsiders = [f"out-{i}" for i in range(8)]  # enrolled, no agent, no status: never eligible
    want = 3
    with LocalFederation(tmp_path / "run", FED, [*agents, *outsiders]) as fed:
        # some work in the plan, so the outsiders' updates arrive while the round is open
        config = start_federation(fed, tmp_path / "data", agents, model, training={"epochs": 20, "batch_size": 1},
                                  rounds={"total": 3, "clients_per_round": want, "over_selection": 0.0,
                                          "quorum": want, "deadline_seconds": 60.0})
        tap = Tap(fed)
        # every agent's eligible status is retained before the aggregator subscribes: it sees all five at once
        tap.wait_until(lambda: {m.client for m in tap.seen if m.kind == "status" and m.payload
                                and m.json()["eligible"]} >= set(agents), 60, "five eligible statuses",
                       fed.processes.values())
        b = fed.broker
        sessions = {o: open_client(b.tls_host, b.tls_port, o, fed.passwords[o], client_id=o, ca_file=b.ca_file)
                    for o in outsiders}
        fed.start("aggregator", "aggregator", config)
        announced = tap.wait(announcement(1), 120, "round 1", fed.processes.values())
        a = announced.json()
        assert "selected" not in a and a["selection"]["rule"] == "sha256-64"
        assert not any(c.encode() in announced.payload for c in agents)  # no client id on the wire
        selected = chosen(a, agents)
        sitting_out = sorted(set(agents) - set(selected))
        assert len(selected) == want, a["selection"]

        # one outsider under the threshold (it would think itself selected), one above: both refused unselected
        under, above = chosen(a, outsiders)[0], next(o for o in outsiders if o not in chosen(a, outsiders))
        manifest = json.loads((model / "manifest.json").read_text())
        zeros = {w["name"]: np.zeros(w["shape"], np.float32) for w in manifest["weights"]}
        for outsider in (under, above):
            header = Header(kind="update", federation=FED, round=1, model_hash=manifest["model_hash"],
                            client_id=outsider, num_examples=10, run=a["run"])
            sessions[outsider].publish(topics.update_topic(FED, outsider), encode_update(zeros, header))

        record = wait_for(lambda: completed(fed, 1), 120, "round 1", fed.processes.values())
        tap.poll()
        assert record["selected"] == want and record["accepted"] == want, record
        assert set(record["update_norms"]) == set(selected)
        assert record["rejected"] == {"unselected": 2}, record["rejected"]
        assert record["refusals"]["update"] == {"unselected": 2}
        assert updates_for(tap.seen, 1) == {c: 1 for c in [*selected, under, above]}  # nothing from the others
        for agent in agents:
            log = fed.processes[agent].log.read_text()
            trained = re.search(r"round 1: sent update of \d+ B", log) is not None
            assert trained is (agent in selected), (agent, fed.processes[agent].log_tail())
        for agent in sitting_out:  # they followed the announcement, and neither trained nor answered it
            progress = fed.run_dir / "agents" / agent / "state" / "progress.json"
            assert json.loads(progress.read_text())["round"] >= 1
            assert not [m for m in tap.seen if m.kind == "reports" and m.client == agent and m.json()["round"] == 1]
            assert "round 1 " not in fed.processes[agent].log.read_text()  # no decline, no abort
        for session in sessions.values():
            session.close()
