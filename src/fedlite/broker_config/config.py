"""The broker directory: its layout, its settings file and the rendered mosquitto.conf."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from fedlite.broker_config.bridge import Bridge, render_bridge
from fedlite.broker_config.limits import DEFAULT_MAX_PACKET_SIZE, check_max_packet_size
from fedlite.fsutil import write_private
from fedlite.protocol.topics import check_id

SETTINGS_FILE = "fedlite-broker.json"
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


@dataclass(frozen=True)
class BrokerPaths:
    """Where everything of one broker lives, relative to its directory."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def password_file(self) -> Path:
        """Devices' passwords: read by the device listeners only."""
        return self.root / "passwd"

    @property
    def acl_file(self) -> Path:
        """Devices' ACL (device listeners)."""
        return self.root / "acl"

    @property
    def aggregator_password_file(self) -> Path:
        """Aggregators' passwords: read by the aggregator listener only."""
        return self.root / "aggregators.passwd"

    @property
    def aggregator_acl_file(self) -> Path:
        """Aggregators' ACL (aggregator listener)."""
        return self.root / "aggregators.acl"

    @property
    def principals(self) -> Path:
        return self.root / "principals.json"

    @property
    def revoked(self) -> Path:
        """Accounts `fedlite broker revoke` removed, with when (for `fedlite broker list`)."""
        return self.root / "revoked.json"

    @property
    def data(self) -> Path:
        """Persistence directory; the broker writes mosquitto.db here."""
        return self.root / "data"

    @property
    def run(self) -> Path:
        """Runtime directory; the broker writes its pid file here."""
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.run / "mosquitto.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "mosquitto.log"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.certs / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.certs / "server.key"

    @property
    def bridges(self) -> Path:
        """The bridge to a central broker, if this is an edge site's broker (`bridge`): private conf files."""
        return self.root / "bridges"

    @property
    def credentials(self) -> Path:
        """Generated credentials, one small TOML file per device or aggregator (0600)."""
        return self.root / "credentials"


@dataclass
class BrokerSettings:
    """What `init_broker_dir` was asked for; stored next to mosquitto.conf as JSON."""

    port: int
    tls_port: int | None
    federations: list[str]
    bind: str = "127.0.0.1"
    plain_bind: str = "127.0.0.1"
    max_queued_messages: int = 100_000
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    device_port: int | None = None  # plain listener for devices on this host (loopback), if any
    bridge: dict[str, Any] | None = None  # an edge site's broker: its bridge to the central one (`bridge.Bridge`)

    def save(self, paths: BrokerPaths) -> None:
        paths.settings.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BrokerSettings:
        path = BrokerPaths(Path(directory)).settings
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} is not a fedlite broker directory (no {SETTINGS_FILE}); "
                "create it with `fedlite broker init`"
            )
        values = json.loads(path.read_text())
        values.pop("message_size_limit", None)  # replaced by max_packet_size
        return cls(**values)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, found by binding port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _federation_list(federations: str | Iterable[str]) -> list[str]:
    items = [federations] if isinstance(federations, str) else list(federations)
    if not items:
        raise ValueError("at least one federation is required")
    return sorted({check_id(f, "federation") for f in items})


def _check_port(port: int, what: str) -> int:
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"invalid {what} {port!r}: use 1-65535, or 0 for a free port")
    return port or free_port()


def server_names(bind: str) -> tuple[list[str], list[str]]:
    """(host names, IP addresses) a generated server certificate is valid for, given the TLS bind address."""
    hostnames, ips = ["localhost"], ["127.0.0.1", "::1"]
    if bind not in ("127.0.0.1", "::1", "localhost"):
        hostnames += [socket.gethostname(), f"{socket.gethostname()}.local"]
    if bind not in ("0.0.0.0", "::", "localhost", *ips):
        ips.append(bind)
    return hostnames, ips


def _template(name: str) -> Template:
    return Template(resources.files("fedlite.broker_config").joinpath(name).read_text())


def render_conf(paths: BrokerPaths, settings: BrokerSettings) -> str:
    """mosquitto.conf for `settings`, with absolute paths into the broker directory."""
    device_auth = _template("device_auth.conf.tmpl").substitute(
        password_file=paths.password_file, acl_file=paths.acl_file
    )
    sections = []
    if settings.tls_port is not None:
        sections.append(_template("tls_listener.conf.tmpl").substitute(
            tls_port=settings.tls_port,
            bind=settings.bind,
            cafile=paths.ca_cert,
            certfile=paths.server_cert,
            keyfile=paths.server_key,
            device_auth=device_auth,
        ))
    if settings.device_port is not None:
        sections.append(_template("device_listener.conf.tmpl").substitute(
            device_port=settings.device_port, plain_bind=settings.plain_bind, device_auth=device_auth
        ))
    return _template("mosquitto.conf.tmpl").substitute(
        aggregator_password_file=paths.aggregator_password_file,
        aggregator_acl_file=paths.aggregator_acl_file,
        persistence_location=paths.data,
        pid_file=paths.pid_file,
        max_queued_messages=settings.max_queued_messages,
        max_packet_size=settings.max_packet_size,
        port=settings.port,
        plain_bind=settings.plain_bind,
        device_listeners="\n".join(sections),
        bridges=(f"# --- Bridge to the central broker (an edge site) ---------------------------------------\n"
                 f"include_dir {paths.bridges}" if settings.bridge else ""),
    )


def init_broker_dir(
    directory: str | os.PathLike,
    *,
    federations: str | Iterable[str],
    port: int = DEFAULT_PORT,
    tls_port: int | None = DEFAULT_TLS_PORT,
    bind: str = "127.0.0.1",
    max_queued_messages: int = 100_000,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    device_port: int | None = None,
    make_certs: bool = True,
    bridge_to: tuple[Bridge, str] | None = None,
) -> BrokerSettings:
    """Create (or refresh) a broker directory: mosquitto.conf, password and ACL files, data dirs.

    `port` is the plain listener on loopback for aggregators (only aggregator accounts can log in
    there), `tls_port` the TLS listener for devices on `bind` (None: no TLS listener), `device_port` an
    optional plain listener for devices on loopback (simulated fleets, agents on the broker's host).
    On device listeners a client's id is its username. A port of 0 picks a free one now.
    `max_packet_size` bounds every MQTT packet (see `limits.packet_limit_for_model`). With
    `make_certs`, a missing CA / server certificate is generated (a test PKI; replace it in
    production). `bridge_to` (a site's bridge and password, `bridge.read_credentials`) makes this an edge site's
    broker, bridged to the central one. Re-running keeps users, passwords, credentials, certificates and the
    bridge.
    """
    from fedlite.broker_config import acl, certs, credentials, permissions

    paths = BrokerPaths(Path(directory).resolve())
    kept = BrokerSettings.load(paths.root).bridge if paths.settings.exists() else None
    settings = BrokerSettings(
        port=_check_port(port, "port"),
        tls_port=None if tls_port is None else _check_port(tls_port, "TLS port"),
        federations=_federation_list(federations),
        bind=bind,
        max_queued_messages=max_queued_messages,
        max_packet_size=check_max_packet_size(max_packet_size),
        device_port=None if device_port is None else _check_port(device_port, "device port"),
        bridge=bridge_to[0].as_dict() if bridge_to else kept,
    )
    ports = [p for p in (settings.port, settings.tls_port, settings.device_port) if p is not None]
    if len(set(ports)) != len(ports):
        raise ValueError(f"the listeners need different ports (given {', '.join(map(str, ports))})")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.root.chmod(0o755)
    account = permissions.broker_account()
    if account is not None:
        permissions.check_reachable(paths.root, account)
    for sub in (paths.data, paths.run):
        sub.mkdir(exist_ok=True)
    paths.credentials.mkdir(mode=0o700, exist_ok=True)
    paths.credentials.chmod(0o700)
    if settings.tls_port is not None and make_certs:
        certs.ensure_test_pki(paths.certs, *server_names(bind))
    for password_file in (paths.password_file, paths.aggregator_password_file):
        if not password_file.exists():
            password_file.touch(mode=0o600)
    credentials.separate_aggregator_passwords(paths)
    if bridge_to is not None:
        _write_bridge(paths, bridge_to, settings.federations)
    settings.save(paths)
    paths.conf.write_text(render_conf(paths, settings))
    acl.write_acl(paths)
    permissions.grant_broker_access(paths)
    return settings


def _write_bridge(paths: BrokerPaths, bridge_to: tuple[Bridge, str], federations: list[str]) -> None:
    """bridges/<site>.conf (0600, it holds the password), replacing any bridge written before."""
    paths.bridges.mkdir(mode=0o700, exist_ok=True)
    for old in paths.bridges.glob("*.conf"):
        old.unlink()
    bridge, password = bridge_to
    write_private(paths.bridges / f"{bridge.site}.conf", render_bridge(bridge, password, federations))
