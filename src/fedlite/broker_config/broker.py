"""Running Mosquitto on a broker directory as a supervised foreground child process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from fedlite.broker_config import permissions
from fedlite.broker_config.binaries import find_executable
from fedlite.broker_config.config import BrokerPaths, BrokerSettings

READY_LINE = " running"
RELOAD_LINE = "Reloading config"


class BrokerError(RuntimeError):
    """The broker did not start, stop or reload as asked."""


def _client_host(bind: str) -> str:
    """Address to reach a listener bound to `bind` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _is_mosquitto(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]).startswith(b"mosquitto")


def running_pid(directory: str | os.PathLike) -> int | None:
    """Pid of the mosquitto serving `directory`, from its pid file, if that process is alive."""
    pid_file = BrokerPaths(Path(directory).resolve()).pid_file
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_mosquitto(pid) else None


def reload_running_broker(directory: str | os.PathLike) -> int | None:
    """SIGHUP (reload passwords and ACL) the broker serving `directory`; its pid, None if none runs."""
    pid = running_pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
    return pid


def prepare(directory: str | os.PathLike) -> tuple[BrokerPaths, BrokerSettings]:
    """Check a broker directory and give the mosquitto user access to it; return its paths and settings."""
    paths = BrokerPaths(Path(directory).resolve())
    settings = BrokerSettings.load(paths.root)
    if not paths.conf.exists():
        raise FileNotFoundError(f"{paths.conf} is missing; run `fedlite broker init {paths.root}`")
    permissions.grant_broker_access(paths)
    return paths, settings


class Broker:
    """Mosquitto on a directory made by `init_broker_dir`, run in the foreground as our child.

    Output goes to `<dir>/mosquitto.log`. `start()` returns once every listener accepts
    connections; `restart()` keeps ports and persisted state. Use as a context manager.
    """

    def __init__(self, directory: str | os.PathLike, *, binary: str | None = None, timeout: float = 10.0):
        self.paths = BrokerPaths(Path(directory).resolve())
        self.settings = BrokerSettings.load(self.paths.root)
        self.binary = binary or find_executable("mosquitto")
        self.timeout = timeout
        self._process: subprocess.Popen | None = None
        self._log_offset = 0

    @property
    def host(self) -> str:
        """Address of the aggregator listener (plain, loopback)."""
        return _client_host(self.settings.plain_bind)

    @property
    def port(self) -> int:
        """Port of the aggregator listener: only aggregator accounts can log in there."""
        return self.settings.port

    @property
    def device_host(self) -> str:
        """Address of the plain device listener (loopback)."""
        return _client_host(self.settings.plain_bind)

    @property
    def device_port(self) -> int | None:
        """Port of the plain device listener on loopback, if the broker has one."""
        return self.settings.device_port

    @property
    def tls_host(self) -> str:
        return _client_host(self.settings.bind)

    @property
    def tls_port(self) -> int | None:
        return self.settings.tls_port

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate devices trust for the TLS listener."""
        return self.paths.ca_cert if self.settings.tls_port is not None else None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _listeners(self) -> list[tuple[str, int]]:
        found = [(self.host, self.port)]
        if self.tls_port is not None:
            found.append((self.tls_host, self.tls_port))
        if self.device_port is not None:
            found.append((self.device_host, self.device_port))
        return found

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the broker's log."""
        try:
            text = self.paths.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _log_since_start(self) -> str:
        try:
            with open(self.paths.log_file, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _fail(self, message: str) -> BrokerError:
        return BrokerError(f"{message}\n--- {self.paths.log_file} (tail) ---\n{self.log_tail()}")

    def start(self) -> Broker:
        """Start mosquitto and wait until its listeners accept connections."""
        if self.running:
            raise BrokerError(f"broker for {self.paths.root} is already running (pid {self.pid})")
        prepare(self.paths.root)
        for host, port in self._listeners():
            if _accepts(host, port):
                raise BrokerError(f"port {port} on {host} is already in use; pick another with init --port")
        self._log_offset = self.paths.log_file.stat().st_size if self.paths.log_file.exists() else 0
        with open(self.paths.log_file, "ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.paths.conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise self._fail(f"mosquitto exited with code {code} while starting")
            ready = READY_LINE in self._log_since_start()
            if ready and all(_accepts(host, port) for host, port in self._listeners()):
                return
            time.sleep(0.05)
        self.stop()
        listeners = self._listeners()
        raise self._fail(f"mosquitto did not accept connections on {listeners} within {self.timeout} s")

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (the broker saves its database), then SIGKILL after `timeout`; the exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def restart(self) -> Broker:
        """Stop and start again: same ports, same persisted retained messages and sessions."""
        self.stop()
        return self.start()

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP: re-read the password and ACL files (after enrolling); waits until the broker has."""
        if not self.running:
            raise BrokerError("broker is not running")
        offset = self.paths.log_file.stat().st_size
        self._process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.paths.log_file, "rb") as f:
                f.seek(offset)
                if RELOAD_LINE.encode() in f.read():
                    return
            time.sleep(0.02)
        raise self._fail(f"broker did not log {RELOAD_LINE!r} within {timeout} s of SIGHUP")

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def exec_broker(directory: str | os.PathLike, binary: str | None = None) -> None:
    """Replace this process with mosquitto on `directory` (foreground, logs to stderr); never returns."""
    paths, _ = prepare(directory)
    mosquitto = binary or find_executable("mosquitto")
    os.execv(mosquitto, [mosquitto, "-c", str(paths.conf)])
