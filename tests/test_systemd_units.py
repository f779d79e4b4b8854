"""The systemd units verify with systemd-analyze and carry the hardening and resource limits we promise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("fedlite-agent.service", "fedlite-aggregator.service")
INSTALLED_FEDLITE = "/opt/fedlite/.venv/bin/fedlite"

HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "60",
    "Restart": "on-failure",
    "RestartSec": "5",
    "User": "fedlite",
}
AGENT = {
    "StateDirectory": "fedlite-agent",
    "ReadOnlyPaths": "/var/lib/fedlite-data",
    "MemoryMax": "200M",
    "CPUQuota": "50%",
    "CPUSchedulingPolicy": "idle",
    "IOSchedulingClass": "idle",
    "Nice": "19",
    "ExecStart": f"{INSTALLED_FEDLITE} agent --config /etc/fedlite/agent.toml",
}
AGGREGATOR = {
    "StateDirectory": "fedlite-aggregator",
    "MemoryMax": "2G",
    "ExecStart": f"{INSTALLED_FEDLITE} aggregator --config /etc/fedlite/aggregator.toml",
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; systemd allows a key more than once."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(unit: str) -> dict[str, list[str]]:
    return parse_unit((SYSTEMD_DIR / unit).read_text())["Service"]


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or shutil.which("systemd-analyze", path="/usr/bin:/bin")
    if not found:
        pytest.fail("systemd-analyze is not installed (apt-get install -y systemd; scripts/test installs it)")
    return found


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    fedlite = Path(sys.prefix) / "bin" / "fedlite"
    assert fedlite.exists(), f"{fedlite} missing: install the project (pip install -e .)"
    text = (SYSTEMD_DIR / unit).read_text()
    assert INSTALLED_FEDLITE in text
    # verify fails when ExecStart's binary does not exist, so point it at this venv's fedlite.
    copy = tmp_path / unit
    copy.write_text(text.replace(INSTALLED_FEDLITE, str(fedlite)))
    command = [systemd_analyze(), "verify", str(copy)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert unit not in output, f"systemd-analyze warned about {unit}:\n{output}"


@pytest.mark.parametrize(("unit", "specific"), [(UNITS[0], AGENT), (UNITS[1], AGGREGATOR)])
def test_unit_has_hardening_and_limits(unit: str, specific: dict[str, str]) -> None:
    settings = service(unit)
    for key, expected in {**HARDENING, **specific}.items():
        assert key in settings, f"{unit}: {key}= missing"
        assert settings[key][-1] == expected, f"{unit}: {key}={settings[key][-1]!r}, expected {expected!r}"
    assert "DynamicUser" not in settings or settings["DynamicUser"][-1] == "no"


def test_aggregator_starts_after_the_broker() -> None:
    unit = parse_unit((SYSTEMD_DIR / UNITS[1]).read_text())["Unit"]
    assert "mosquitto.service" in " ".join(unit["After"])
    assert "mosquitto.service" in " ".join(unit["Wants"])


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SYSTEMD_DIR / "install.sh"), *args], capture_output=True, text=True, timeout=60
    )


def test_install_script_syntax_and_strict_mode() -> None:
    script = (SYSTEMD_DIR / "install.sh").read_text()
    assert "set -euo pipefail" in script
    assert subprocess.run(["bash", "-n", str(SYSTEMD_DIR / "install.sh")]).returncode == 0


@pytest.mark.parametrize(("role", "extra"), [("agent", "agent"), ("aggregator", "server")])
def test_install_script_dry_run(role: str, extra: str) -> None:
    result = run_install("--role", role, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"fedlite\\[{extra}\\]" in out
    assert f"/etc/systemd/system/fedlite-{role}.service" in out
    assert "install -d -m 0750 -o root -g fedlite /etc/fedlite" in out
    assert f"systemctl enable fedlite-{role}.service" in out or f"enable --now fedlite-{role}" in out


def test_install_script_legacy_extra() -> None:
    result = run_install("--role", "agent", "--extra", "agent-legacy", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "fedlite\\[agent-legacy\\]" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--role agent|aggregator is required"),
        (("--role", "server"), "--role must be agent or aggregator"),
        (("--role",), "--role needs a value"),
        (("--role", "agent", "--extra", "gpu"), "--extra must be"),
        (("--role", "agent", "--bogus"), "unknown option"),
    ],
)
def test_install_script_rejects_bad_arguments(args: tuple[str, ...], message: str) -> None:
    result = run_install(*args)
    assert result.returncode == 2
    assert message in result.stderr
