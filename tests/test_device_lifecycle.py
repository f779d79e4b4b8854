"""Device lifecycle on the broker: enrol (never a password on a command line), re-enrol only with --force, list,
revoke (a revoked device is refused by the running broker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from broker_fixtures import open_client, running_broker

from fedlite.broker_config import credentials

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
