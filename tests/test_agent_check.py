"""`fedlite agent --check`: one line per check against a real broker and the model a real aggregator publishes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from federation_helpers import initial_model, start_federation, write_shards

from fedlite.demo.cluster import LocalFederation, wait_for, write_shard


def _check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlite.cli", "agent", "--check", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


def _lines(result: subprocess.CompletedProcess) -> dict[str, str]:
    """{check name: its line} of the output (the last line is the verdict)."""
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return {line[6:].split(":", 1)[0]: line for line in result.stdout.splitlines()[:-1]}


def test_agent_check_passes_a_good_device_and_names_each_problem_of_a_bad_one(tmp_path: Path) -> None:
    model = initial_model(tmp_path / "cache")
    with LocalFederation(tmp_path / "run", "faults", ["dev-1", "dev-2", "dev-3"]) as fed:
        config = start_federation(fed, tmp_path / "data", [], model, rounds={"clients_per_round": 1})
        shards = write_shards(tmp_path / "data", ["dev-1"])
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: "waiting for eligible devices" in aggregator.log.read_text(), 120,
                 "the aggregator to publish its model", [aggregator])

        good = fed.agent_config("dev-1", shards["dev-1"])
        fed.set_device_state("dev-1", cpu_percent=95.0)  # a busy device: its gate is shown closed, not failed
        result = _check(good)
        lines = _lines(result)
        assert result.returncode == 0, result.stdout
        assert lines["broker"].startswith("ok") and "TLS" in lines["broker"], lines
        assert lines["data fits the model"].startswith("ok") and "fits" in lines["data fits the model"]
        assert lines["gate idle"].startswith("--") and "CPU busy" in lines["gate idle"]
        assert lines["trust"].startswith("ok") and result.stdout.splitlines()[-1].startswith("all ")

        narrow = write_shard(tmp_path / "narrow.npz", np.zeros((40, 10)), np.zeros(40))  # 10 features, model: 64
        result = _check(fed.agent_config("dev-2", narrow))
        lines = _lines(result)
        assert result.returncode == 1
        assert lines["data fits the model"].startswith("FAIL") and "expects [64]" in lines["data fits the model"]

        wrong = fed.agent_config("dev-3", shards["dev-1"])
        (fed.run_dir / "secrets" / "dev-3").write_text("not-the-password")
        result = _check(wrong)
        lines = _lines(result)
        assert result.returncode == 1 and lines["broker"].startswith("FAIL"), result.stdout
        assert "data fits the model" not in lines  # not checked without a login

        broken = tmp_path / "broken.toml"
        broken.write_text(good.read_text() + "\n[agent]\nstatus_interval = 5\n")
        result = _check(broken)
        assert result.returncode == 1 and result.stdout.startswith("FAIL  config:"), result.stdout
        assert len(result.stdout.splitlines()) == 2
