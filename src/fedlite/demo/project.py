"""`fedlite new`: a ready federation project — Keras model, data loader hook, sample data, configs, drop-ins."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from fedlite.demo.datasets import Task, load_task
from fedlite.demo.partition import partition
from fedlite.protocol.topics import check_id
from fedlite.settings import dump_toml

AGGREGATOR = "aggregator"
WRITABLE = ("data", "state")  # what the data hook and the services write, under the project directory
EXPORT_EVERY = 5  # TFLite re-exports (deployable inference models) every 5th round and at the last one
LOCAL_GATES = {"max_cpu_percent": 100.0, "max_load_per_cpu": 1000.0, "allowed_interfaces": ["lo", "eth*", "en*",
                                                                                            "wlan*", "wl*"]}


class ProjectError(ValueError):
    """A project that cannot be written here; the message says why."""


@dataclass(frozen=True)
class ProjectSpec:
    root: Path
    task: str = "digits"
    devices: int = 3
    rounds: int = 20
    port: int = 1883
    device_port: int = 1884
    seed: int = 0
    federation: str = ""

    @property
    def name(self) -> str:
        """The federation's name: given, or the directory's name made a valid id."""
        return self.federation or re.sub(r"[^A-Za-z0-9._-]+", "-", self.root.name).strip("-._")[:64] or "fedlite"

    @property
    def device_ids(self) -> list[str]:
        return [f"device-{i}" for i in range(1, self.devices + 1)]


Files = dict[str, str]
WRITERS: list[Callable[[ProjectSpec, Task], Files]] = []


def writer(fn: Callable[[ProjectSpec, Task], Files]) -> Callable[[ProjectSpec, Task], Files]:
    WRITERS.append(fn)
    return fn


def _template(template: str, **values: Any) -> str:
    text = resources.files("fedlite.demo").joinpath("project_templates", template).read_text()
    return Template(text).substitute({k: str(v) for k, v in values.items()})


def _shape(task: Task) -> str:
    return repr(tuple(task.input_shape))


@writer
def _python_files(spec: ProjectSpec, task: Task) -> Files:
    shape = dict(input_shape=_shape(task), classes=task.classes)
    hidden = list(task.options.get("hidden", [64, 32]))
    return {"model.py": _template("model.py.tmpl", **shape, seed=spec.seed, hidden=hidden,
                                  name=re.sub(r"[^A-Za-z0-9_]", "_", spec.name)),
            "data.py": _template("data.py.tmpl", **shape, task=task.name)}


@writer
def _aggregator_toml(spec: ProjectSpec, task: Task) -> Files:
    config = {
        "federation": {"name": spec.name, "state_dir": "state/aggregator"},
        "model": {"keras": "model.keras", "seed": spec.seed, "export_every": EXPORT_EVERY},
        "rounds": {"total": spec.rounds, "clients_per_round": spec.devices, "quorum": max(1, spec.devices // 2),
                   "deadline_seconds": 60.0, "wait_for_devices_seconds": 30.0, "status_ttl_seconds": 30.0,
                   "seed": spec.seed},
        "training": {"epochs": 2, "batch_size": task.batch_size, "learning_rate": task.lr},
        "evaluation": {"test_data": "sample/test.npz"},
        "broker": {"host": "127.0.0.1", "port": spec.port, "username": AGGREGATOR,
                   "password_file": f"broker/credentials/{AGGREGATOR}.password"},
        "signing": {"key_file": "keys/aggregator.key"},
    }
    header = ("# fedlite aggregator: fedlite aggregator --config aggregator.toml (from this directory; relative paths\n"
              "# are the working directory's). README.md has every command.\n")
    return {"aggregator.toml": header + dump_toml(config)}


def agent_config(spec: ProjectSpec, device: str) -> dict[str, dict[str, Any]]:
    return {
        "device": {"client_id": device, "federation": spec.name, "state_dir": f"state/{device}"},
        "data": {"source": "npz", "path": f"data/{device}.npz", "holdout_fraction": 0.2},
        "broker": {"host": "127.0.0.1", "port": spec.device_port, "tls": False, "username": device,
                   "password_file": f"broker/credentials/{device}.password"},
        "trust": {"aggregator_keys": ["keys/aggregator.pub"]},
        "agent": {"status_interval_seconds": 5.0},
        "gates": LOCAL_GATES,
    }


@writer
def _agent_tomls(spec: ProjectSpec, task: Task) -> Files:
    header = ("# fedlite agent {device}: fedlite agent --config agents/{device}.toml (from the project directory).\n"
              "# [gates] is opened up for one machine running everything; on a device delete it (the defaults train\n"
              "# only when idle, charged and on an unmetered network). python data.py {device} writes [data] path.\n")
    return {f"agents/{d}.toml": header.format(device=d) + dump_toml(agent_config(spec, d)) for d in spec.device_ids}


@writer
def _systemd_dropins(spec: ProjectSpec, task: Task) -> Files:
    root = spec.root.resolve()
    return {"systemd/fedlite-agent.service.d/override.conf":
            _template("fedlite-agent.conf.tmpl", root=root, device=spec.device_ids[0]),
            "systemd/fedlite-aggregator.service.d/override.conf":
            _template("fedlite-aggregator.conf.tmpl", root=root)}


@writer
def _readme(spec: ProjectSpec, task: Task) -> Files:
    enrol = [f"fedlite broker enrol broker {d} --federation {spec.name}" for d in spec.device_ids]
    agents = [f"fedlite agent --config agents/{d}.toml &" for d in spec.device_ids]
    return {"README.md": _template("README.md.tmpl", name=spec.root.name, task=task.name,
                                   description=task.description, devices=spec.devices, rounds=spec.rounds,
                                   federation=spec.name, port=spec.port, device_port=spec.device_port,
                                   device_list=" ".join(spec.device_ids), enrol_lines="\n".join(enrol),
                                   agent_lines="\n".join(agents), root=spec.root.resolve())}


def sample_data(spec: ProjectSpec, task: Task) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sample/<device>.npz (an IID split of the task's training set) and sample/test.npz (its test set)."""
    parts = partition("iid", task.y_train, spec.devices, np.random.default_rng(spec.seed))
    shards = {f"sample/{d}.npz": (task.x_train[idx], task.y_train[idx]) for d, idx in zip(spec.device_ids, parts,
                                                                                           strict=True)}
    return shards | {"sample/test.npz": (task.x_test, task.y_test)}


def check(spec: ProjectSpec) -> None:
    """ProjectError naming what makes `spec` unusable: an existing non-empty directory, a bad name or count."""
    if spec.root.exists() and (not spec.root.is_dir() or any(spec.root.iterdir())):
        raise ProjectError(f"{spec.root} already exists and is not an empty directory")
    try:
        check_id(spec.name, "federation name")
    except ValueError as exc:
        raise ProjectError(f"{exc} (pass --federation)") from None
    if spec.devices < 1:
        raise ProjectError(f"--devices must be at least 1, not {spec.devices}")
    if spec.rounds < 1:
        raise ProjectError(f"--rounds must be at least 1, not {spec.rounds}")
    for what, port in (("--port", spec.port), ("--device-port", spec.device_port)):
        if not 1 <= port <= 65535:
            raise ProjectError(f"{what} must be a TCP port (1-65535), not {port}")
    if spec.port == spec.device_port:
        raise ProjectError(f"--port and --device-port must differ (both {spec.port})")


def write_project(spec: ProjectSpec) -> list[Path]:
    """Write the project under `spec.root`; the files written, relative to it."""
    check(spec)
    try:
        task = load_task(spec.task, seed=spec.seed)
    except KeyError as exc:
        raise ProjectError(str(exc.args[0])) from None
    files: Files = {}
    for write in WRITERS:
        files |= write(spec, task)
    written = []
    for relative, text in files.items():
        path = spec.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(Path(relative))
    for folder in WRITABLE:  # the drop-ins' ReadWritePaths, which must exist when a unit starts
        (spec.root / folder).mkdir(parents=True, exist_ok=True)
    for relative, (x, y) in sample_data(spec, task).items():
        (spec.root / relative).parent.mkdir(parents=True, exist_ok=True)
        np.savez(spec.root / relative, x=x, y=y)
        written.append(Path(relative))
    return written
