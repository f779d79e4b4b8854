"""A ready-to-copy enrolment bundle for one device: agent.toml with the broker's real address, the broker's CA,
the aggregator's public key and the device's password file, as one tar file to unpack into /etc/fedlite."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import time
from pathlib import Path

from fedlite.broker_config.config import BrokerPaths, BrokerSettings

CONFIG_DIR = "/etc/fedlite"  # where the device unpacks the bundle; agent.toml names its files there
WILDCARD = {"0.0.0.0", "::", ""}


def device_host(settings: BrokerSettings, host: str | None) -> str:
    """The address a device dials: `host` if given, the TLS listener's bind address, or this machine's name
    when it binds every interface (its certificate holds that name: `fedlite broker certs`)."""
    if host:
        return host
    return socket.getfqdn() if settings.bind in WILDCARD else settings.bind


def agent_toml(client_id: str, federation: str, host: str, port: int) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string
    return "\n".join([
        f"# fedlite agent for {client_id}; unpack the bundle into {CONFIG_DIR} and set [data] to the device's data.",
        "[device]", f"client_id = {q(client_id)}", f"federation = {q(federation)}",
        'state_dir = "/var/lib/fedlite-agent"', "",
        "[data]", 'source = "shards"', 'path = "/var/lib/fedlite-data/shards"', "",
        "[broker]", f"host = {q(host)}", f"port = {port}", "tls = true", f"ca_file = {q(CONFIG_DIR + '/ca.crt')}",
        f"username = {q(client_id)}", f"password_file = {q(f'{CONFIG_DIR}/{client_id}.password')}", "",
        "[trust]", f"aggregator_keys = [{q(CONFIG_DIR + '/aggregator.pub')}]", "",
    ])


def check_bundle(directory: str | os.PathLike, aggregator_key: Path) -> tuple[BrokerPaths, BrokerSettings]:
    """What a bundle needs, checked before anything is enrolled: a TLS listener and the aggregator's key."""
    paths = BrokerPaths(Path(directory).resolve())
    settings = BrokerSettings.load(paths.root)
    if settings.tls_port is None:
        raise ValueError(f"the broker in {paths.root} has no TLS listener: a bundle is for devices over TLS")
    if not aggregator_key.is_file():
        raise ValueError(f"aggregator public key {aggregator_key} does not exist")
    return paths, settings


def write_bundle(directory: str | os.PathLike, client_id: str, federation: str, password: str,
                 aggregator_key: Path, out: Path, host: str | None = None) -> Path:
    """`out` (a tar): agent.toml, ca.crt, aggregator.pub and <client_id>.password (mode 0600 in the archive; the
    tar file itself is written 0600)."""
    paths, settings = check_bundle(directory, aggregator_key)
    members = {
        "agent.toml": (agent_toml(client_id, federation, device_host(settings, host), settings.tls_port).encode(),
                       0o644),
        "ca.crt": (paths.ca_cert.read_bytes(), 0o644),
        "aggregator.pub": (aggregator_key.read_bytes(), 0o644),
        f"{client_id}.password": (password.encode() + b"\n", 0o600),
    }
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for name, (data, mode) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out
