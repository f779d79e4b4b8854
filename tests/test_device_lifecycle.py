"""Device lifecycle on the broker: enrol (never a password on a command line; a ready-to-copy bundle), re-enrol only
with --force, list, revoke (a revoked device is refused by the running broker)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from broker_fixtures import open_client, running_broker

from fedlite.broker_config import credentials
from fedlite.protocol.signing import generate_keypair

FED = "lifecycle"


def _fedlite(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlite.cli", "broker", *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_enrolment_hashes_the_password_without_putting_it_on_a_command_line(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real = subprocess.run

    def spy(cmd, *args, **kwargs):  # records each command line; the real mosquitto_passwd still runs
        seen.append([str(c) for c in cmd])
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(credentials.subprocess, "run", spy)
    with running_broker(tmp_path, federation=FED, devices=[]) as b:
        password = credentials.enrol_device(b.directory, "dev-1", FED, "a-secret-password-42")
        assert seen and not any(password in part for cmd in seen for part in cmd), seen
        b.broker.reload()
        session = open_client(b.tls_host, b.tls_port, "dev-1", password, ca_file=b.ca)
        assert session.connected  # the hash is right
        session.close()


def test_a_revoked_device_is_refused_listed_as_revoked_and_re_enrolment_needs_force(tmp_path: Path) -> None:
    with running_broker(tmp_path, federation=FED, devices=["dev-1", "dev-2"]) as b:
        home = str(b.directory)
        held = open_client(b.tls_host, b.tls_port, "dev-1", b.credentials["dev-1"], ca_file=b.ca)
        status = f"fl/{FED}/status/dev-1"
        assert held.connected and held.publish(status, b"{}").value in (0, 16)  # accepted (16: no subscriber yet)

        again = _fedlite("enrol", home, "dev-1", "--federation", FED)
        assert again.returncode == 2 and "already enrolled" in again.stderr and "--force" in again.stderr
        assert len(again.stderr.strip().splitlines()) == 1

        revoked = _fedlite("revoke", home, "dev-1")
        assert revoked.returncode == 0, revoked.stderr
        assert "revoked device dev-1" in revoked.stdout and "sent SIGHUP" in revoked.stdout
        assert not credentials.credentials_path(home, "dev-1").exists()
        time.sleep(0.5)  # the broker rereads its password file on SIGHUP
        held.next_disconnect(5)  # the connection it held is dropped by the reloading broker
        held.close()
        refused = open_client(b.tls_host, b.tls_port, "dev-1", b.credentials["dev-1"], ca_file=b.ca)
        assert not refused.connected and refused.connack is not None and refused.connack.is_failure
        other = open_client(b.tls_host, b.tls_port, "dev-2", b.credentials["dev-2"], ca_file=b.ca)
        assert other.connected  # the others stay
        other.close()

        fleet = tmp_path / "fleet.json"
        fleet.write_text(json.dumps({"devices": [{"client_id": "dev-2", "last_seen": 1.8e9, "state": "online",
                                                  "stale": False}]}))
        listed = _fedlite("list", home, "--fleet", str(fleet))
        assert listed.returncode == 0, listed.stderr
        rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
        assert "revoked" in rows["dev-1"] and "enrolled" in rows["dev-2"] and "online" in rows["dev-2"]
        assert "enrolled" in rows["aggregator"]

        assert _fedlite("revoke", home, "dev-9").returncode == 2
        back = _fedlite("enrol", home, "dev-1", "--federation", FED)  # revoked: no longer enrolled, no --force
        assert back.returncode == 0, back.stderr
        forced = _fedlite("enrol", home, "dev-2", "--federation", FED, "--force")
        assert forced.returncode == 0, forced.stderr
        rows = {line.split()[0]: line for line in _fedlite("list", home).stdout.splitlines()[1:]}
        assert "enrolled" in rows["dev-1"]


def test_an_enrolment_bundle_unpacks_into_an_agent_that_logs_in(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "keys")
    with running_broker(tmp_path, federation=FED, devices=[]) as b:
        bundle = tmp_path / "pi-7.tar"
        missing = _fedlite("enrol", str(b.directory), "pi-7", "--federation", FED, "--bundle", str(bundle))
        assert missing.returncode == 2 and "--aggregator-key" in missing.stderr
        assert "pi-7" not in _fedlite("list", str(b.directory)).stdout  # nothing enrolled by the refused call
        made = _fedlite("enrol", str(b.directory), "pi-7", "--federation", FED, "--bundle", str(bundle),
                        "--aggregator-key", str(public), "--host", "localhost")
        assert made.returncode == 0, made.stderr
        assert bundle.stat().st_mode & 0o077 == 0
        with tarfile.open(bundle) as tar:
            names = {m.name: m.mode for m in tar.getmembers()}
            assert names == {"agent.toml": 0o644, "ca.crt": 0o644, "aggregator.pub": 0o644, "pi-7.password": 0o600}
            device = tmp_path / "etc"
            tar.extractall(device, filter="data")
        # the device's /etc/fedlite is `device` here; its data: a small shard
        np_data = tmp_path / "shard.npz"
        np.savez(np_data, x=np.zeros((20, 64), np.float32), y=np.zeros(20, np.int64))
        text = (device / "agent.toml").read_text().replace("/etc/fedlite", str(device))
        text = text.replace('source = "shards"', 'source = "npz"').replace("/var/lib/fedlite-data/shards", str(np_data))
        text = text.replace("/var/lib/fedlite-agent", str(tmp_path / "state"))
        (device / "agent.toml").write_text(text + f'\n[state]\nprovider = "file"\nfile = "{tmp_path / "s.json"}"\n')
        b.broker.reload()
        check = subprocess.run([sys.executable, "-m", "fedlite.cli", "agent", "--check", "--config",
                                str(device / "agent.toml")], capture_output=True, text=True, timeout=120)
        broker_line = next(line for line in check.stdout.splitlines() if "broker:" in line)
        assert broker_line.startswith("ok") and f":{b.tls_port} (TLS) as pi-7" in broker_line, check.stdout
