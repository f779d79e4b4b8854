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
    "KillMode": "mixed",  # SIGTERM to the agent alone: it stops its round's process itself
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


def restart_prevented(unit: str) -> set[int]:
    return {int(code) for value in service(unit).get("RestartPreventExitStatus", []) for code in value.split()}


def bad_config(tmp_path: Path, case: str) -> list[str]:
    """`--config ...` arguments of one kind of unusable configuration."""
    path = tmp_path / "service.toml"
    if case == "directory":
        path.mkdir()
    elif case == "not-utf8":
        path.write_bytes(b"\xff\xfe[device]\n")
    elif case == "not-toml":
        path.write_text("[device\n")
    elif case == "no-config":
        return []
    return ["--config", str(path)]


@pytest.mark.parametrize("case", ["missing", "directory", "not-utf8", "not-toml", "no-config"])
@pytest.mark.parametrize("role", ["agent", "aggregator"])
def test_a_bad_config_exits_with_a_code_the_unit_does_not_restart(tmp_path: Path, role: str, case: str) -> None:
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", role, *bad_config(tmp_path, case)],
                            capture_output=True, text=True, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert 2 in restart_prevented(f"fedlite-{role}.service")
    if case != "no-config":  # argparse's usage and its error line
        assert len(result.stderr.splitlines()) == 1 and str(tmp_path) in result.stderr, result.stderr


def test_the_clis_config_error_codes_are_the_ones_the_units_list() -> None:
    from fedlite.agent import cli as agent_cli
    from fedlite.aggregator import cli as aggregator_cli

    assert restart_prevented(UNITS[0]) == {agent_cli.CONFIG_ERROR}
    assert agent_cli.DATA_ERROR not in restart_prevented(UNITS[0])  # data the device's app may still write
    assert restart_prevented(UNITS[1]) == {aggregator_cli.CONFIG_ERROR, aggregator_cli.STORAGE_FAILURE}


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
    assert f"pip install --quiet --upgrade {SYSTEMD_DIR.parent}\\[{extra}\\]" in out  # the checkout by default
    assert f"/etc/fedlite/{role}.toml.example" in out
    dropin = "write /etc/systemd/system/mosquitto.service.d/fedlite.conf: ExecStart=/usr/sbin/mosquitto -c " \
             "/var/lib/fedlite-broker/mosquitto.conf"
    assert (dropin in out) == (role == "aggregator"), out
    assert f"/etc/systemd/system/fedlite-{role}.service" in out
    assert "install -d -m 0750 -o root -g fedlite /etc/fedlite" in out
    assert f"systemctl enable fedlite-{role}.service" in out or f"enable --now fedlite-{role}" in out


def test_install_script_legacy_extra() -> None:
    result = run_install("--role", "agent", "--extra", "agent-legacy", "--source", "fedlite", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "install --quiet --upgrade fedlite\\[agent-legacy\\]" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--role agent|aggregator is required"),
        (("--role", "server"), "--role must be agent or aggregator"),
        (("--role",), "--role needs a value"),
        (("--role", "agent", "--extra", "gpu"), "--extra must be"),
        (("--role", "agent", "--bogus"), "unknown option"),
        (("--role", "agent", "--dest-root", "/nonexistent/root"), "is not a directory"),
        (("--role", "aggregator", "--broker-dir", "broker"), "--broker-dir must be an absolute path"),
    ],
)
def test_install_script_rejects_bad_arguments(args: tuple[str, ...], message: str) -> None:
    result = run_install(*args)
    assert result.returncode == 2
    assert message in result.stderr


def staged(tmp_path: Path, role: str, *args: str) -> dict[str, str]:
    """Run install.sh into a temporary root: {path under it: text} of every file it wrote."""
    result = run_install("--role", role, "--dest-root", str(tmp_path), *args)
    assert result.returncode == 0, result.stderr
    return {"/" + str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file()}


def test_install_script_stages_the_agent_unit_and_example_config(tmp_path: Path) -> None:
    from fedlite.agent.config import load_config

    files = staged(tmp_path, "agent")
    assert set(files) == {"/etc/systemd/system/fedlite-agent.service", "/etc/fedlite/agent.toml.example"}
    assert files["/etc/systemd/system/fedlite-agent.service"] == (SYSTEMD_DIR / UNITS[0]).read_text()
    assert (tmp_path / "var/lib/fedlite-data").is_dir()
    config = load_config(tmp_path / "etc/fedlite/agent.toml.example")  # the example is a valid config
    assert config.broker.tls and config.trust.aggregator_keys and not config.trust.allow_unsigned


def test_install_script_stages_the_aggregator_and_the_mosquitto_drop_in(tmp_path: Path) -> None:
    from fedlite.aggregator.config import load_config

    files = staged(tmp_path, "aggregator", "--broker-dir", "/srv/broker")
    dropin = "/etc/systemd/system/mosquitto.service.d/fedlite.conf"
    assert set(files) == {"/etc/systemd/system/fedlite-aggregator.service", "/etc/fedlite/aggregator.toml.example",
                          dropin}
    conf = parse_unit(files[dropin])
    assert conf["Service"]["ExecStart"] == ["", "/usr/sbin/mosquitto -c /srv/broker/mosquitto.conf"]
    assert conf["Unit"]["ConditionPathExists"] == ["/srv/broker/mosquitto.conf"]
    assert load_config(tmp_path / "etc/fedlite/aggregator.toml.example").federation.name


def test_the_mosquitto_drop_in_verifies_on_the_installed_mosquitto_unit(tmp_path: Path) -> None:
    mosquitto_unit = Path("/lib/systemd/system/mosquitto.service")
    if not mosquitto_unit.exists():
        pytest.fail("mosquitto.service missing (apt-get install -y mosquitto; scripts/test installs it)")
    (tmp_path / "root").mkdir()
    staged(tmp_path / "root", "aggregator", "--broker-dir", str(tmp_path / "broker"))
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker/mosquitto.conf").write_text("listener 0 127.0.0.1\n")
    unit_dir = tmp_path / "units"
    (unit_dir / "mosquitto.service.d").mkdir(parents=True)
    (unit_dir / "mosquitto.service").write_text(mosquitto_unit.read_text())
    dropin = tmp_path / "root/etc/systemd/system/mosquitto.service.d/fedlite.conf"
    (unit_dir / "mosquitto.service.d/fedlite.conf").write_text(dropin.read_text())
    env = {"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    result = subprocess.run([systemd_analyze(), "verify", str(unit_dir / "mosquitto.service")], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fedlite.conf" not in result.stdout + result.stderr, result.stdout + result.stderr
