"""Model registry and staged rollout end to end: real Mosquitto, real agent processes, the real aggregator.

A small federation trains 3 rounds (a version per round) and keeps serving rollouts. Through the real
`fedlite model` CLI: the first promote reaches every device; a good candidate passes its canaries and is
promoted; a scrambled-weights candidate makes its canaries report worse accuracy and is rolled back
automatically; a manual rollback round trip reaches every device. The models on disk and the devices'
status are checked at every step.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import Tap
from helpers_models import digits_split

from fedlite.demo.cluster import LocalFederation, wait_for, write_shard
from fedlite.protocol.signing import MAGIC as SIGNED

FED = "rollout"
AGENTS = ["dev-1", "dev-2", "dev-3", "dev-4"]
ROUNDS = 3
BAD = 50  # the version number of the scrambled candidate
MODEL = {"arch": "mlp", "input_shape": [64], "classes": 10, "export_every": 1}


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Fleet:
    """The federation as the test sees it: registry, CLI, the devices' model files and statuses."""

    def __init__(self, fed: LocalFederation, tap: Tap) -> None:
        self.fed = fed
        self.tap = tap
        self.state_dir = fed.run_dir / "aggregator"

    def registry(self) -> dict:
        path = self.state_dir / "registry.json"
        return json.loads(path.read_text()) if path.exists() else {"versions": [], "rollout": None}

    def sha(self, version: int) -> str:
        return next(v["sha256"] for v in self.registry()["versions"] if v["version"] == version)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedlite.cli", "model", *args, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=60)

    def model_file(self, agent: str, suffix: str = "") -> Path:
        return self.fed.run_dir / "agents" / agent / "app" / f"model.tflite{suffix}"

    def statuses(self) -> dict[str, dict]:
        self.tap.poll()
        latest: dict[str, dict] = {}
        for m in self.tap.seen:
            if m.kind == "status" and m.payload:
                latest[m.client] = m.json()
        return latest

    def on(self, version: int, agents: list[str] = AGENTS) -> bool:
        """Every agent's model file is the version's int8 model and its status says so."""
        sha, statuses = self.sha(version), self.statuses()
        return all(_sha(self.model_file(a)) == sha and statuses.get(a, {}).get("deployed_model") == sha
                   for a in agents)

    def wait_on(self, version: int, what: str, agents: list[str] = AGENTS) -> None:
        wait_for(lambda: self.on(version, agents), 60, what, self.fed.processes.values())

    def rollout(self, state: str) -> dict:
        return wait_for(lambda: (r := self.registry()["rollout"]) and r["state"] == state and r, 60,
                        f"the rollout to be {state}", self.fed.processes.values())

    def deployed_reports(self, version: int) -> dict[str, dict]:
        self.tap.poll()
        return {m.client: m.json() for m in self.tap.seen if m.kind == "reports" and m.json()["kind"] == "deployed"
                and m.json()["round"] == version}


@pytest.fixture()
def fleet(tmp_path: Path):
    x_train, y_train, x_test, y_test = digits_split()
    with LocalFederation(tmp_path / "run", FED, AGENTS) as fed:
        fed.start_broker()
        tap = Tap(fed, client_id="rollout-tap")
        for agent, part in zip(AGENTS, np.array_split(np.random.default_rng(0).permutation(len(x_train)),
                                                      len(AGENTS)), strict=True):
            shard = write_shard(tmp_path / f"{agent}.npz", x_train[part], y_train[part])
            app_model = fed.run_dir / "agents" / agent / "app" / "model.tflite"
            fed.start(agent, "agent", fed.agent_config(agent, shard, agent={"status_interval_seconds": 0.5},
                                                       deploy={"path": str(app_model)}))
        np.savez(tmp_path / "test.npz", x=x_test, y=y_test)
        config = fed.aggregator_config(
            model=MODEL,
            rounds={"total": ROUNDS, "clients_per_round": len(AGENTS), "over_selection": 0.0,
                    "deadline_seconds": 30.0, "wait_for_devices_seconds": 20.0},
            training={"epochs": 2, "batch_size": 16, "learning_rate": 0.1},
            evaluation={"test_data": str(tmp_path / "test.npz")},
            rollout={"canary_fraction": 0.3, "margin": 0.1, "timeout_seconds": 30.0, "serve_after_rounds": True},
        )
        fed.start("aggregator", "aggregator", config)
        yield Fleet(fed, tap)
        tap.close()


def _scrambled_candidate(fleet: Fleet, source: int) -> None:
    """Export a real int8 model from `source`'s weights shuffled, as the aggregator's exporter lays it out."""
    from fedlite.aggregator.config import ModelSection
    from fedlite.aggregator.export import export_round, version_dir
    from fedlite.protocol.layout import unflatten
    from fedlite.runtime.trainer import Trainer

    models = fleet.state_dir / "models"
    folder = version_dir(models, source)
    manifest = json.loads((folder / "manifest.json").read_text())
    flat = Trainer((folder / "train.tflite").read_bytes(), manifest).get_weights()
    scrambled = unflatten(np.random.default_rng(1).permutation(flat).astype(np.float32), manifest)
    representative = digits_split()[2][:200]
    staging = models / ".staging"  # exported aside, then renamed in: the registry never sees half a folder
    export_round(ModelSection(**MODEL), staging, scrambled, representative, {"round": BAD, "accuracy": None})
    staging.rename(version_dir(models, BAD))


def test_promote_canary_automatic_rollback_and_manual_rollback(fleet: Fleet):
    procs = fleet.fed.processes.values()
    aggregator = fleet.fed.processes["aggregator"]
    wait_for(lambda: "serving rollouts after the last round" in aggregator.log.read_text(), 150,
             "the rounds to finish", procs, poll=0.5)
    wait_for(lambda: [v["version"] for v in fleet.registry()["versions"]] == [1, 2, 3], 60, "versions 1-3", procs)
    registry = fleet.registry()
    assert all(v["accuracy"] is not None and v["path"].endswith(f"round-{v['version']:05d}")
               for v in registry["versions"])
    assert registry["deployed"] is None

    # unknown versions: a clear error, nothing queued
    bad = fleet.cli("promote", "99")
    assert bad.returncode == 2 and "unknown version 99 (known versions: 1, 2, 3)" in bad.stderr
    assert fleet.registry()["requests"] == []

    # 1. first promote: nothing deployed yet, so version 2 goes to every device
    done = fleet.cli("promote", "2")
    assert done.returncode == 0 and "first deployment" in done.stdout, done
    fleet.wait_on(2, "every device to run version 2")
    assert set(fleet.deployed_reports(2)) == set(AGENTS)
    assert all(not fleet.model_file(a, ".previous").exists() for a in AGENTS)

    # 2. a good candidate: canaries first, then every device
    started = fleet.cli("promote", "3")
    assert started.returncode == 0 and "on canaries" in started.stdout, started
    promoted = fleet.rollout("promoted")
    assert promoted["candidate"] == 3 and promoted["previous"] == 2 and len(promoted["canaries"]) == 2
    assert set(promoted["reports"]) == set(promoted["canaries"])
    fleet.wait_on(3, "every device to run version 3")
    assert fleet.registry()["deployed"] == 3
    assert all(_sha(fleet.model_file(a, ".previous")) == fleet.sha(2) for a in AGENTS)

    # 3. a scrambled candidate: canaries install it, report it worse, the aggregator rolls back on its own
    _scrambled_candidate(fleet, 3)
    wait_for(lambda: BAD in [v["version"] for v in fleet.registry()["versions"]], 30, "the bad version", procs)
    started = fleet.cli("promote", str(BAD))
    assert started.returncode == 0, started
    rolled = fleet.rollout("rolled_back")
    canaries = rolled["canaries"]
    others = [a for a in AGENTS if a not in canaries]
    assert rolled["candidate"] == BAD and rolled["previous"] == 3 and len(canaries) == 2
    assert "below the margin" in rolled["reason"]
    assert set(rolled["reports"]) == set(canaries)
    for report in rolled["reports"].values():
        assert report["accuracy_candidate"] < report["accuracy_current"] - 0.3, report
    assert set(fleet.deployed_reports(BAD)) == set(canaries)  # each canary really installed it
    fleet.wait_on(3, "the canaries to reinstall version 3")
    assert fleet.registry()["deployed"] == 3
    assert all(_sha(fleet.model_file(a, ".previous")) == fleet.sha(BAD) for a in canaries)
    assert all(_sha(fleet.model_file(a, ".previous")) == fleet.sha(2) for a in others)  # never saw it

    # 4. manual rollback round trip: back to the previously deployed version (2), then forward to 3
    back = fleet.cli("rollback")
    assert back.returncode == 0 and "version 2 deployed to every device" in back.stdout, back
    fleet.wait_on(2, "every device to roll back to version 2")
    again = fleet.cli("rollback", "3")
    assert again.returncode == 0, again
    fleet.wait_on(3, "every device to return to version 3")
    final = fleet.registry()
    assert final["deployed"] == 3 and final["rollout"]["state"] == "rolled_back"
    assert [r["state"] for r in final["requests"]] == ["done"] * 5

    listing = fleet.cli("list")
    assert listing.returncode == 0 and "deployed: 3" in listing.stdout
    rows = {ln.split()[0]: ln for ln in listing.stdout.splitlines()[1:] if ln.split() and ln.split()[0].isdigit()}
    assert set(rows) == {"1", "2", "3", str(BAD)} and rows["3"].endswith("deployed"), listing.stdout

    deploys = [m for m in fleet.tap.seen if m.kind == "deploy"]
    assert len(deploys) >= 7 and all(m.raw.startswith(SIGNED) for m in deploys)  # the tap checked each signature
    logs = "".join(p.log.read_text() for p in procs)
    assert "Traceback" not in logs
