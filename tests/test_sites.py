"""Edge sites: a broker and a site aggregator per site, bridged to the central broker; one partial sum per site."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from federation_helpers import Tap, announcement, history, initial_model, start_federation, write_shards

from fedlite.broker_config.acl import site_rules
from fedlite.broker_config.bridge import bridge_topics
from fedlite.demo.cluster import LocalFederation, wait_for

SITES = {"plant-a": ["a-1", "a-2"], "plant-b": ["b-1", "b-2"]}
ROUNDS = 8


def test_a_sites_bridge_carries_broadcasts_down_and_one_partial_sum_up_never_a_devices_update() -> None:
    lines = bridge_topics("f", "plant-a")
    assert "topic fl/f/model/# in 1" in lines and "topic fl/f/cluster/grant/plant-a in 0" in lines
    assert "topic fl/f/cluster/partial/plant-a out 1" in lines and "topic fl/f/status/+ out 1" in lines
    assert not any("updates" in line for line in lines)
    rules = site_rules("f", "plant-a")
    assert "topic write fl/f/cluster/partial/plant-a" in rules
    assert not any(rule.startswith("topic write") and ("plant-b" in rule or "model" in rule or "round" in rule)
                   for rule in rules)  # it cannot speak for another site, nor broadcast


def test_broker_init_bridge_to_a_file_that_is_not_site_credentials_is_a_one_line_error(tmp_path: Path) -> None:
    wrong = tmp_path / "device.toml"
    wrong.write_text('[device]\nclient_id = "d"\n[broker]\nhost = "h"\nport = 1\ntls = true\n')
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "broker", "init", str(tmp_path / "site"),
                             "--federation", "f", "--port", "0", "--tls-port", "0", "--bridge-to", str(wrong)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a site credentials file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("tables, message", [("[cluster]\nsite = true\n", "cluster.site needs cluster.member")])
def test_a_site_without_a_name_is_a_one_line_config_error(tmp_path: Path, tables: str, message: str) -> None:
    from fedlite.aggregator.config import load_config
    from fedlite.settings import ConfigError

    path = tmp_path / "aggregator.toml"
    path.write_text("[federation]\nname = \"f\"\n[signing]\nkey_file = \"k\"\n" + tables)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_two_bridged_sites_train_the_model_and_a_site_broker_restart_loses_no_completed_round(
        tmp_path: Path) -> None:
    model = initial_model(tmp_path / "cache")
    devices = [d for site in SITES.values() for d in site]
    shards = write_shards(tmp_path / "data", devices)
    with LocalFederation(tmp_path / "run", "faults", []) as fed:
        config = start_federation(
            fed, tmp_path / "data", [], model, broker={"share_group": "aggregators"},
            rounds={"total": ROUNDS, "clients_per_round": len(devices), "quorum": 2, "deadline_seconds": 8.0},
            cluster={"partial_timeout_seconds": 5.0})
        central = fed.start_central(config)
        tap = Tap(fed)  # on the central broker: sees what crosses the bridges
        fed.start_sites(config, SITES)
        for device in devices:
            fed.start(device, "agent", fed.agent_config(device, shards[device], agent={"status_interval_seconds": 0.5}))
        everyone = list(fed.processes.values())
        tap.wait(announcement(3), 180, "round 3 to open", everyone)
        fed.sites["plant-a"].broker.restart()  # mid-round: its devices, bridge and aggregator reconnect
        wait_for(lambda: central.popen.poll() is not None, 240, "the run to end", everyone, poll=0.5)
        assert central.popen.returncode == 0, central.log_tail(40)

        done = [r for r in history(fed) if r["status"] == "complete"]
        assert [r["round"] for r in done] == list(range(1, ROUNDS + 1))  # each once, none lost to the restart
        assert done[-1]["accuracy"] >= done[0]["kpis"]["initial_accuracy"] + 0.3, [r["accuracy"] for r in done]
        for record in done:  # every update came through a site aggregator's partial sum
            assert sum(record["aggregators"].values()) == record["accepted"], record
        assert {name for name, n in done[-1]["aggregators"].items() if n} == set(SITES), done[-1]  # plant-a is back
        tap.poll(0.5)
        assert not [s for s in tap.seen if s.kind == "updates"]  # no device update crossed a bridge
        assert {s.client for s in tap.seen if s.kind == "status"} >= set(devices)


def test_simulate_with_sites_merges_one_partial_sum_per_site_and_reports_central_traffic(tmp_path: Path) -> None:
    import json

    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "simulate", "--clients", "60", "--rounds", "2",
                             "--sites", "2", "--processes", "2", "--run-dir", str(tmp_path / "sim"), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "central broker: median" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    shares = summary["aggregators"]
    assert shares["central"]["updates"] == 0  # no device is on the central broker
    history = json.loads((tmp_path / "sim" / "aggregator" / "history.json").read_text())
    accepted = [r["accepted"] for r in history if r["status"] == "complete"]
    assert len(accepted) == 2 and min(accepted) >= 54, accepted
    assert shares["site-1"]["updates"] > 0 and shares["site-2"]["updates"] > 0  # each site's devices, via its sum
    assert shares["site-1"]["updates"] + shares["site-2"]["updates"] == sum(accepted)
    assert len(summary["central_broker_bytes_per_round"]) == 2 and all(
        n > 0 for n in summary["central_broker_bytes_per_round"])
