"""A federation on one machine: a real Mosquitto, the aggregator and agents as separate processes (and edge sites:
a Mosquitto each, bridged to the central one, with a site aggregator)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.agent.state import write_state
from fedlite.aggregator.record import RoundRecord, records
from fedlite.broker_config import permissions
from fedlite.broker_config.bridge import read_credentials
from fedlite.broker_config.broker import Broker
from fedlite.broker_config.config import init_broker_dir
from fedlite.broker_config.credentials import add_aggregator, add_site, credentials_path, enrol_devices
from fedlite.broker_config.limits import DEFAULT_MAX_PACKET_SIZE
from fedlite.protocol.signing import Signer, generate_keypair
from fedlite.settings import dump_toml

AGGREGATOR_USER = "aggregator"
# Devices simulated on one machine keep their round's process between rounds (`[agent] keep_process_seconds`):
# ten agents starting one each per second on two cores would spend the rounds starting interpreters. A real
# device runs one agent, whose round process exits after each round (the default).
SIMULATED_KEEP_PROCESS_SECONDS = 30.0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class EdgeSite:
    """A site's broker (bridged to the central one) and the devices that talk to it alone."""

    name: str
    broker: Broker
    devices: list[str]

    @property
    def aggregator_user(self) -> str:
        return f"{AGGREGATOR_USER}@{self.name}"  # its key in LocalFederation.passwords


@dataclass
class LocalFederation:
    """Everything a run needs under `run_dir`; `stop()` ends every process it started."""

    run_dir: Path
    federation: str
    devices: list[str]
    tls: bool = True
    broker: Broker | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)
    sites: dict[str, EdgeSite] = field(default_factory=dict)
    _cleanup: list[Path] = field(default_factory=list)

    # --- broker -------------------------------------------------------------------------------

    @property
    def signing_key(self) -> Path:
        """The aggregator's private key (made on first use); agents pin the public key beside it."""
        private = self.run_dir / "keys" / "aggregator.key"
        if not private.exists():
            generate_keypair(private.parent)
        return private

    def sign(self, topic: str, payload: bytes) -> bytes:
        """Sign a broadcast as the aggregator does (for tests that play the aggregator's part)."""
        return Signer.from_file(self.signing_key).sign(topic, payload)

    def start_broker(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, sites: bool = False) -> Broker:
        """Init and start the broker on free ports: the aggregator listener, and TLS for the agents (or,
        with `tls=False`, a plain device listener on loopback); `max_packet_size` bounds every packet. With
        `sites`, a TLS listener in any case (edge sites' bridges use it)."""
        home = self._broker_home()
        init_broker_dir(home, federations=self.federation, port=0, tls_port=0 if self.tls or sites else None,
                        device_port=None if self.tls else 0, max_packet_size=max_packet_size)
        self.passwords[AGGREGATOR_USER] = add_aggregator(home, AGGREGATOR_USER, self.federation)
        self.passwords |= enrol_devices(home, self.devices, self.federation)
        self.broker = Broker(home).start()
        return self.broker

    def start_site(self, name: str, devices: list[str]) -> EdgeSite:
        """An edge site: its broker (on free ports, bridged over TLS to the central one, which must be up), its
        aggregator account, and `devices` enrolled there (not on the central broker)."""
        assert self.broker is not None and self.broker.tls_port is not None, "start the central broker first"
        central = self.broker.paths.root
        add_site(central, name, self.federation)
        self.broker.reload()
        home = self._broker_home(f"site-{name}")
        init_broker_dir(home, federations=self.federation, port=0, tls_port=0 if self.tls else None,
                        device_port=None if self.tls else 0, max_packet_size=self.broker.settings.max_packet_size,
                        bridge_to=read_credentials(credentials_path(central, name)))
        site = EdgeSite(name, Broker(home), devices)
        self.passwords[site.aggregator_user] = add_aggregator(home, AGGREGATOR_USER, self.federation)
        self.passwords |= enrol_devices(home, devices, self.federation)
        site.broker.start()
        self.sites[name] = site
        return site

    def site_of(self, client_id: str) -> EdgeSite | None:
        return next((s for s in self.sites.values() if client_id in s.devices), None)

    def _broker_home(self, name: str = "broker") -> Path:
        """run_dir/<name>, or a folder the broker's own user can reach, linked from there."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        account = permissions.broker_account()
        try:
            if account is not None:
                permissions.check_reachable(self.run_dir, account)
            return self.run_dir / name
        except PermissionError:
            outside = Path(tempfile.mkdtemp(prefix="fedlite-broker-"))
            outside.chmod(0o755)
            self._cleanup.append(outside)
            (self.run_dir / name).symlink_to(outside, target_is_directory=True)
            return outside / name

    # --- configuration --------------------------------------------------------------------------

    def _secret(self, name: str) -> str:
        path = self.run_dir / "secrets" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.passwords[name])
        path.chmod(0o600)
        return str(path)

    def aggregator_config(self, **tables: dict[str, Any]) -> Path:
        """Write aggregator.toml; `tables` override or extend its sections."""
        assert self.broker is not None, "start the broker first"
        config = {
            "federation": {"name": self.federation, "state_dir": str(self.run_dir / "aggregator")},
            "signing": {"key_file": str(self.signing_key)},
            "broker": {"host": self.broker.host, "port": self.broker.port, "username": AGGREGATOR_USER,
                       "password_file": self._secret(AGGREGATOR_USER)},
        }
        return self._write_config("aggregator.toml", config, tables)

    def site_aggregator_config(self, central: Path, site: str) -> Path:
        """sites/<site>/aggregator.toml: the central aggregator's settings, on the site broker, as a site member."""
        from fedlite.settings import read_toml

        broker = self.sites[site].broker
        config = read_toml(central)
        config["federation"]["state_dir"] = str(self.run_dir / "sites" / site / "aggregator")
        config["broker"] = {"host": broker.host, "port": broker.port, "username": AGGREGATOR_USER,
                            "password_file": self._secret(self.sites[site].aggregator_user)}
        config["cluster"] = config.get("cluster", {}) | {"member": site, "site": True}
        return self._write_config(f"sites/{site}/aggregator.toml", config, {})

    def agent_config(self, client_id: str, data_path: Path, **tables: dict[str, Any]) -> Path:
        """Write agents/<id>/agent.toml with a simulated device state file beside it."""
        assert self.broker is not None, "start the broker first"
        home = self.run_dir / "agents" / client_id
        home.mkdir(parents=True, exist_ok=True)
        site = self.site_of(client_id)
        to = site.broker if site is not None else self.broker  # a site's device talks to its site's broker alone
        broker: dict[str, Any] = {"username": client_id, "password_file": self._secret(client_id)}
        if self.tls:
            broker |= {"host": to.tls_host, "port": to.tls_port, "tls": True, "ca_file": str(to.ca_file)}
        else:
            broker |= {"host": to.device_host, "port": to.device_port, "tls": False}
        config = {
            "device": {"client_id": client_id, "federation": self.federation, "state_dir": str(home / "state")},
            "data": {"source": "npz", "path": str(data_path)},
            "broker": broker,
            "state": {"provider": "file", "file": str(self.state_file(client_id))},
            "agent": {"status_interval_seconds": 1.0},
            "trust": {"aggregator_keys": [str(self.signing_key.with_suffix(".pub"))]},
        }
        return self._write_config(f"agents/{client_id}/agent.toml", config, tables)

    def state_file(self, client_id: str) -> Path:
        return self.run_dir / "agents" / client_id / "device_state.json"

    def set_device_state(self, client_id: str, **values: Any) -> None:
        """Change a simulated device's state; its agent sees it through the same gate code."""
        self.state_file(client_id).parent.mkdir(parents=True, exist_ok=True)
        write_state(self.state_file(client_id), **values)

    def _write_config(self, relative: str, config: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> Path:
        for table, values in overrides.items():
            config[table] = config.get(table, {}) | values
        path = self.run_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump_toml(config))
        return path

    # --- processes ------------------------------------------------------------------------------

    def start(self, name: str, role: str, config: Path, log_level: str = "INFO") -> Process:
        """Run `fedlite <role> --config <config>` as a child process logging to run_dir/logs/<name>.log."""
        return self.start_command(
            name, [sys.executable, "-m", "fedlite.cli", role, "--config", str(config), "--log-level", log_level]
        )

    def start_aggregators(self, config: Path, count: int, log_level: str = "INFO") -> list[Process]:
        """`count` aggregators on one federation (`aggregator-<i>`, [cluster] member a<i>): a1 first, which takes
        the coordinator lease; the others then join as members (returns once they have). The config must name a
        broker share_group."""
        lock = self.run_dir / "aggregator" / "coordinator.lock"
        started = []
        for i in range(1, count + 1):
            started.append(self.start_command(f"aggregator-{i}", [
                sys.executable, "-m", "fedlite.cli", "aggregator", "--config", str(config), "--member", f"a{i}",
                "--log-level", log_level]))
            if i == 1:
                wait_for(lambda: lock.is_file() and lock.read_text().startswith("a1 "), 60,
                         "the first aggregator to take the coordinator lease", started)
        wait_for(lambda: all("a member of federation" in p.log.read_text() for p in started[1:]), 60,
                 "the other aggregators to join as members", started)
        return started

    def start_central(self, config: Path, log_level: str = "INFO") -> Process:
        """The central aggregator of a federation with edge sites (`aggregator`, [cluster] member central): it
        coordinates, the site aggregators send it their partial sums. The config must name a broker share_group."""
        lock = self.run_dir / "aggregator" / "coordinator.lock"
        process = self.start_command("aggregator", [
            sys.executable, "-m", "fedlite.cli", "aggregator", "--config", str(config), "--member", "central",
            "--log-level", log_level])
        wait_for(lambda: lock.is_file() and lock.read_text().startswith("central "), 60,
                 "the central aggregator to take the coordinator lease", [process])
        return process

    def start_sites(self, config: Path, sites: dict[str, list[str]]) -> dict[str, Process]:
        """Each site's broker and aggregator (`aggregator-<site>`, configured from the central `config`); returns
        once every site aggregator follows the cluster."""
        started = {}
        for name, devices in sites.items():
            self.start_site(name, devices)
            started[name] = self.start("aggregator-" + name, "aggregator", self.site_aggregator_config(config, name))
        wait_for(lambda: all("a member of federation" in p.log.read_text() for p in started.values()), 60,
                 "the site aggregators to join", started.values())
        return started

    def cluster_tables(self, count: int) -> dict[str, dict[str, Any]]:
        """The aggregator config tables for `count` aggregators sharing the work (nothing for one)."""
        return {"broker": {"share_group": "aggregators"}} if count > 1 else {}

    def start_command(self, name: str, command: list[str]) -> Process:
        """Run `command` as a child process (its own session) logging to run_dir/logs/<name>.log."""
        log = self.run_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                command,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )
        self.processes[name] = Process(name, popen, log)
        return self.processes[name]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        if process.alive():
            os.killpg(process.popen.pid, sig)
            process.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, wait, SIGKILL what is left; then stop the broker."""
        for process in self.processes.values():
            if process.alive():
                _signal_group(process.popen.pid, signal.SIGTERM)
        end = time.time() + timeout
        for process in self.processes.values():
            try:
                process.popen.wait(max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(process.popen.pid, signal.SIGKILL)
                process.popen.wait(5)
        for site in self.sites.values():
            site.broker.stop()
        if self.broker is not None:
            self.broker.stop()
        for folder in self._cleanup:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def agent_seed(seed: int, device: str) -> int:
    """A device's `[agent] seed` (its local shuffles) for a run's `seed`: a run with the same seed repeats its
    devices' batches."""
    return 1 + int.from_bytes(hashlib.sha256(f"{seed}/{device}".encode()).digest()[:6], "big")


def write_shard(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))
    return path


def wait_for(condition: Any, timeout: float, what: str, processes: Iterable[Process] = (), poll: float = 0.2) -> Any:
    """Poll `condition()` until truthy; on timeout raise with the tails of the given processes' logs."""
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in processes)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def follow_history(fed: LocalFederation, aggregator: Process, timeout: float, show: Any,
                   poll: float = 0.25) -> list[RoundRecord]:
    """Call `show(record)` for each round the aggregator records; return its history once it exits cleanly."""
    path = fed.run_dir / "aggregator" / "history.json"
    shown = 0

    def finished() -> bool:
        nonlocal shown
        history = json.loads(path.read_text()) if path.exists() else []
        for record in records(history[shown:]):
            show(record)
        shown = len(history)
        return aggregator.popen.poll() is not None

    wait_for(finished, timeout, "the federated rounds", fed.processes.values(), poll=poll)
    if aggregator.popen.returncode != 0:
        raise RuntimeError(f"the aggregator stopped with an error:\n{aggregator.log_tail(30)}")
    return records(json.loads(path.read_text()))

