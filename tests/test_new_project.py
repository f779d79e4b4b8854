"""`fedlite new`: the generated project runs as its README says (real broker, aggregator, agents, Keras model),
its systemd drop-ins verify on fedlite's units, and a used directory is refused."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from broker_fixtures import broker_directory
from test_systemd_units import INSTALLED_FEDLITE, SYSTEMD_DIR, systemd_analyze

from fedlite.broker_config.config import free_port
from fedlite.cli import main

BIN = Path(sys.executable).parent


def readme_commands(project: Path) -> list[str]:
    """The shell commands of the README's "Run it on this machine" block, in order."""
    text = (project / "README.md").read_text()
    block = re.search(r"## Run it on this machine\n\n```sh\n(.*?)```", text, re.S)
    assert block is not None, text
    return [line for line in block.group(1).splitlines() if line.strip()]


def _stop(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_a_new_project_runs_as_its_readme_says_and_learns_from_its_keras_model(tmp_path: Path) -> None:
    with broker_directory(tmp_path) as reachable:  # a directory mosquitto's own user can enter
        project = reachable.parent / "digits-project"
        assert main(["new", str(project), "--devices", "2", "--rounds", "2", "--port", str(free_port()),
                     "--device-port", str(free_port())]) == 0
        background = _run_readme(project)
        try:
            aggregator, log = next((p, log) for p, log in background.items() if "aggregator" in p.args)
            assert aggregator.wait(timeout=90) == 0, log.read_text()
        finally:
            _stop(list(background))
        history = json.loads((project / "state/aggregator/history.json").read_text())
        complete = [r for r in history if r.get("status") == "complete"]
        accuracy = [r["accuracy"] for r in complete]
        assert [r["round"] for r in complete] == [1, 2]
        assert accuracy[-1] > accuracy[0] and accuracy[-1] > 0.6, accuracy
        manifest = json.loads((project / "state/aggregator/models/round-00000/manifest.json").read_text())
        assert manifest["arch"] == "keras"  # from model.keras (its weights: test_keras_export)
        assert [layer["name"] for layer in manifest["options"]["layers"]] == ["hidden0", "hidden1", "logits"]


def _run_readme(project: Path) -> dict[subprocess.Popen, Path]:
    """Run the README's commands from the project directory as written: those ending in & in the background
    (returned with their logs), the others to completion, each asserted to succeed."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    background: dict[subprocess.Popen, Path] = {}
    try:
        for number, command in enumerate(readme_commands(project)):
            if not command.endswith("&"):
                done = subprocess.run(shlex.split(command), cwd=project, env=env, capture_output=True, text=True,
                                      timeout=120)
                assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
                continue
            log = project / f"process-{number}.log"
            with log.open("w") as out:
                proc = subprocess.Popen(shlex.split(command[:-1]), cwd=project, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            background[proc] = log
            if "broker run" in command:
                time.sleep(0.5)  # its listeners, before anyone dials them
    except BaseException:
        _stop(list(background))
        raise
    return background


def test_new_refuses_a_used_directory_and_bad_options_in_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    cases = {(str(used),): "already exists and is not an empty directory",
             (str(tmp_path / "a"), "--devices", "0"): "--devices must be at least 1",
             (str(tmp_path / "b"), "--port", "1884"): "--port and --device-port must differ",
             (str(tmp_path / "c"), "--federation", "no spaces"): "invalid federation name"}
    for args, message in cases.items():
        assert main(["new", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # nothing written
    assert (used / "notes.txt").read_text() == "mine"


def test_the_generated_configs_load_and_the_drop_ins_verify_on_fedlites_units(tmp_path: Path) -> None:
    from fedlite.agent.config import load_config as load_agent
    from fedlite.settings import read_toml

    project = tmp_path / "proj"
    assert main(["new", str(project), "--devices", "3"]) == 0
    agents = sorted((project / "agents").glob("*.toml"))
    assert [a.stem for a in agents] == ["device-1", "device-2", "device-3"]
    for path in agents:
        config = load_agent(path)
        assert config.data.path == f"data/{path.stem}.npz" and config.device.federation == "proj"
    assert read_toml(project / "aggregator.toml")["model"]["keras"] == "model.keras"
    assert (project / "data").is_dir() and (project / "state").is_dir()  # the drop-ins' ReadWritePaths
    shards = [np.load(project / f"sample/{a.stem}.npz")["y"] for a in agents]
    assert len(set(np.concatenate(shards).tolist())) == 10 and min(len(s) for s in shards) > 300
    fedlite = str(BIN / "fedlite")
    for unit in ("fedlite-agent.service", "fedlite-aggregator.service"):
        units = tmp_path / "units" / unit
        (units / f"{unit}.d").mkdir(parents=True)
        (units / unit).write_text((SYSTEMD_DIR / unit).read_text().replace(INSTALLED_FEDLITE, fedlite))
        dropin = (project / "systemd" / f"{unit}.d" / "override.conf").read_text()
        assert str(project.resolve()) in dropin
        (units / f"{unit}.d/override.conf").write_text(dropin.replace(INSTALLED_FEDLITE, fedlite)
                                                       .replace("/opt/fedlite/.venv/bin/python", sys.executable))
        result = subprocess.run([systemd_analyze(), "verify", str(units / unit)], capture_output=True, text=True,
                                timeout=60, env={"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{units}:"})
        assert result.returncode == 0 and "override.conf" not in result.stdout + result.stderr, result.stderr
