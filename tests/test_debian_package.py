"""scripts/build-deb builds fedlite-agent_<version>_all.deb, which installs offline with dpkg and purges cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PACKAGE = "fedlite-agent"
VENV = Path("/opt/fedlite/.venv")


def run(*command: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)


def installed() -> bool:
    return run("dpkg-query", "-W", "-f=${Status}", PACKAGE).stdout.endswith("installed")


@pytest.fixture
def deb(tmp_path: Path) -> Path:
    result = run(ROOT / "scripts/build-deb", "--out", tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    built = tmp_path / f"{PACKAGE}_{VERSION}_all.deb"
    assert result.stdout.splitlines()[-1] == str(built)
    return built


@pytest.fixture
def machine() -> Iterator[bool]:
    """This machine, without the package before and after; yields whether the `fedlite` user existed before."""
    if os.geteuid() != 0 or not shutil.which("dpkg"):
        pytest.skip("installing a .deb needs root and dpkg")
    assert not installed(), f"{PACKAGE} is installed on this machine already"
    had_user = run("getent", "passwd", "fedlite").returncode == 0
    try:
        yield had_user
    finally:
        if installed() or run("dpkg-query", "-W", PACKAGE).returncode == 0:
            run("dpkg", "--purge", PACKAGE)


@pytest.mark.slow
def test_the_deb_installs_offline_runs_the_agent_and_purges_cleanly(deb: Path, machine: bool) -> None:
    info = run("dpkg-deb", "--field", deb, "Package", "Version", "Architecture", "Depends").stdout
    assert f"Package: {PACKAGE}\nVersion: {VERSION}\nArchitecture: all\n" in info, info
    assert "python3-venv" in info
    # no network while installing: the venv comes from the bundled wheels alone
    install = run("unshare", "--net", "dpkg", "-i", deb, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    files = set(run("dpkg", "-L", PACKAGE).stdout.splitlines())
    assert {"/usr/lib/systemd/system/fedlite-agent.service", "/etc/fedlite/agent.toml.example",
            f"/opt/fedlite/wheels/fedlite-{VERSION}-py3-none-any.whl"} <= files
    unit = Path("/usr/lib/systemd/system/fedlite-agent.service").read_text()
    assert unit == (ROOT / "systemd/fedlite-agent.service").read_text()
    assert f"ExecStart={VENV}/bin/fedlite agent" in unit
    assert run("getent", "passwd", "fedlite").returncode == 0
    assert Path("/etc/fedlite").stat().st_gid == int(run("getent", "group", "fedlite").stdout.split(":")[2])

    help_ = run(VENV / "bin/fedlite", "agent", "--help")
    assert help_.returncode == 0 and "--config" in help_.stdout, help_.stderr
    probe = "import fedlite; from fedlite.runtime.interpreter import runtime_name as r; print(r(), fedlite.__file__)"
    runtime, where = run(VENV / "bin/python", "-c", probe).stdout.split()
    assert runtime == "ai-edge-litert" and where.startswith(str(VENV)), where  # not this checkout's fedlite

    purge = run("dpkg", "--purge", PACKAGE)
    assert purge.returncode == 0, purge.stderr
    assert not Path("/opt/fedlite").exists() and not Path("/etc/fedlite").exists()
    assert (run("getent", "passwd", "fedlite").returncode == 0) == machine  # only a user it made is removed
