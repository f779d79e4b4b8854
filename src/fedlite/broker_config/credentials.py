"""Enrolling devices, aggregators and edge sites: Mosquitto passwords, ACL entries and a credentials file each."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import tomllib
from pathlib import Path
from typing import Any

from fedlite.broker_config import acl, permissions
from fedlite.broker_config.binaries import find_executable
from fedlite.broker_config.config import BrokerPaths, BrokerSettings
from fedlite.fsutil import write_private
from fedlite.protocol.topics import check_id

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def generate_password() -> str:
    """A random 32-character URL-safe password (192 bits)."""
    return secrets.token_urlsafe(24)


def _check_password(password: str) -> str:
    if not isinstance(password, str) or not password or any(ord(c) < 32 for c in password):
        raise ValueError("password must be a non-empty string without control characters")
    return password


def password_file(paths: BrokerPaths, role: acl.Role) -> Path:
    """The password file of `role`'s listener(s): devices' and aggregators' accounts are kept apart (an edge site's
    bridge logs in where devices do, over TLS)."""
    return paths.aggregator_password_file if role == "aggregator" else paths.password_file


def set_password(paths: BrokerPaths, username: str, password: str, role: acl.Role = "device") -> None:
    """Add or replace `username` in `role`'s password file. The password is hashed by `mosquitto_passwd -U` on a
    private file (never given on a command line, where `ps` would show it)."""
    file = password_file(paths, role)
    batch = paths.root / f".passwd-{secrets.token_hex(6)}"
    write_private(batch, f"{username}:{password}\n")
    try:
        result = subprocess.run([find_executable("mosquitto_passwd"), "-U", str(batch)], capture_output=True, text=True)
        if result.returncode != 0:
            detail = result.stderr.strip() or result.stdout.strip()
            raise RuntimeError(f"mosquitto_passwd failed for {username!r}: {detail}")
        hashed = batch.read_text().strip()
    finally:
        batch.unlink(missing_ok=True)
    kept = [line for line in _password_lines(file) if line.split(":", 1)[0] != username]
    write_private(file, "".join(line + "\n" for line in [*kept, hashed]))


def remove_password(paths: BrokerPaths, username: str, role: acl.Role) -> None:
    file = password_file(paths, role)
    kept = [line for line in _password_lines(file) if line.split(":", 1)[0] != username]
    write_private(file, "".join(line + "\n" for line in kept))


def _password_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def separate_aggregator_passwords(paths: BrokerPaths) -> None:
    """Move aggregator accounts out of the devices' password file into the aggregators' one.

    Brokers made before the listeners had their own password files kept every account in one file;
    a device listener must not know aggregator accounts, nor the aggregator listener device ones.
    """
    aggregators = set(acl.load_principals(paths)["aggregator"])
    lines = _password_lines(paths.password_file)
    moved = [line for line in lines if line.split(":", 1)[0] in aggregators]
    if not moved:
        return
    known = {line.split(":", 1)[0] for line in _password_lines(paths.aggregator_password_file)}
    kept = _password_lines(paths.aggregator_password_file)
    kept += [line for line in moved if line.split(":", 1)[0] not in known]
    write_private(paths.aggregator_password_file, "\n".join(kept) + "\n")
    rest = [line for line in lines if line not in moved]
    write_private(paths.password_file, "".join(line + "\n" for line in rest))


def credentials_path(directory: str | os.PathLike, name: str) -> Path:
    """Where the credentials file of device or aggregator `name` is written."""
    return BrokerPaths(Path(directory).resolve()).credentials / f"{check_id(name, 'name')}.toml"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    return "\n".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
        for name, values in sections.items()
    )


def _connection(paths: BrokerPaths, settings: BrokerSettings, role: acl.Role) -> dict[str, Any]:
    if role == "aggregator":
        return {"host": settings.plain_bind, "port": settings.port, "tls": False}
    if settings.tls_port is not None:
        host = "localhost" if settings.bind in LOOPBACK | {"0.0.0.0", "::"} else settings.bind
        return {"host": host, "port": settings.tls_port, "tls": True, "ca_file": str(paths.ca_cert)}
    if settings.device_port is not None:
        return {"host": settings.plain_bind, "port": settings.device_port, "tls": False}
    raise ValueError(f"the broker in {paths.root} has no listener for devices; "
                     "run `fedlite broker init` with --tls-port or --device-port")


def _write_credentials(
    paths: BrokerPaths, role: acl.Role, name: str, federation: str, password: str
) -> Path:
    """`<name>.toml`: the [device] or [federation] and [broker] sections of the agent's or aggregator's
    config, ready to paste; and `<name>.password` holding just the password (for `password_file`)."""
    settings = BrokerSettings.load(paths.root)
    path = credentials_path(paths.root, name)
    write_private(path.with_suffix(".password"), password + "\n")
    identity = {
        "device": {"device": {"client_id": name, "federation": federation}},
        "aggregator": {"federation": {"name": federation}},
        "site": {"site": {"name": name, "federation": federation}},
    }[role]
    broker = {**_connection(paths, settings, role), "username": name, "password": password}
    use = (f"# Give it to the site broker: fedlite broker init SITE_DIR --federation {federation} --bridge-to "
           f"{path.name}\n" if role == "site" else
           f"# Paste into the {'agent' if role == 'device' else 'aggregator'}'s TOML config, or set\n"
           f"# password_file = \"/etc/fedlite/{name}.password\" (a copy of {path.with_suffix('.password')}).\n")
    header = f"# fedlite {role} credentials for {name} (federation {federation}); keep this file private.\n" + use
    write_private(path, header + _toml({**identity, "broker": broker}))
    return path


def _enrol(
    directory: str | os.PathLike, role: acl.Role, name: str, federation: str, password: str | None,
    force: bool = False,
) -> str:
    paths = BrokerPaths(Path(directory).resolve())
    settings = BrokerSettings.load(paths.root)
    check_id(name, f"{role} name")
    check_id(federation, "federation")
    if federation not in settings.federations:
        raise ValueError(
            f"federation {federation!r} is not served by the broker in {paths.root} "
            f"(it serves {', '.join(settings.federations)}); add it with `fedlite broker init --federation`"
        )
    password = _check_password(password) if password is not None else generate_password()
    enrolled = acl.load_principals(paths)[role].get(name)
    if enrolled and not force:
        raise ValueError(f"{role} {name!r} is already enrolled (federation {', '.join(enrolled)}); enrolling it again "
                         "issues a new password and its current credentials stop working: pass --force to do so")
    if role != "aggregator":
        _connection(paths, settings, role)  # the device (site) has a listener to use, before anything is written
    acl.add_principal(paths, role, name, federation)
    acl.forget_revoked(paths, name)
    set_password(paths, name, password, role)
    acl.write_acl(paths)
    _write_credentials(paths, role, name, federation, password)
    permissions.grant_broker_access(paths)
    return password


def enrol_device(
    directory: str | os.PathLike, client_id: str, federation: str, password: str | None = None, force: bool = False
) -> str:
    """Let device `client_id` into `federation`; return its password (generated unless given).

    Enrolling a device again needs `force`: it sets a new password (the old credentials stop working) and keeps
    the device's other federations. The credentials land in `credentials_path(directory, client_id)`. A running
    broker needs SIGHUP to see the change.
    """
    return _enrol(directory, "device", client_id, federation, password, force)


def add_aggregator(
    directory: str | os.PathLike, username: str, federation: str, password: str | None = None, force: bool = False
) -> str:
    """Let aggregator `username` run `federation`; return its password (generated unless given)."""
    return _enrol(directory, "aggregator", username, federation, password, force)


def add_site(directory: str | os.PathLike, name: str, federation: str, password: str | None = None,
             force: bool = False) -> str:
    """Let edge site `name` bridge its broker into `federation` (`bridge`); return its password (generated unless
    given). Its credentials file is what `fedlite broker init --bridge-to` reads on the site broker."""
    return _enrol(directory, "site", name, federation, password, force)


def revoke(directory: str | os.PathLike, name: str) -> tuple[acl.Role, list[str]]:
    """Remove `name`'s password, ACL entries and credentials files (a running broker needs SIGHUP); it is listed as
    revoked from then on. Returns its role and federations; ValueError if nothing of that name is enrolled."""
    paths = BrokerPaths(Path(directory).resolve())
    BrokerSettings.load(paths.root)
    principals = acl.load_principals(paths)
    role = next((r for r in acl.ROLES if name in principals[r]), None)
    if role is None:
        raise ValueError(f"nothing named {name!r} is enrolled in the broker in {paths.root}")
    federations = principals[role].pop(name)
    acl.save_principals(paths, principals)
    acl.record_revoked(paths, name, role, federations)
    remove_password(paths, name, role)
    acl.write_acl(paths)
    path = credentials_path(paths.root, name)
    for private in (path, path.with_suffix(".password")):
        private.unlink(missing_ok=True)
    permissions.grant_broker_access(paths)
    return role, federations


def load_credentials(path: str | os.PathLike) -> dict[str, Any]:
    """Read a credentials file: {"device" (or "federation"): {...}, "broker": {...}}."""
    with open(path, "rb") as f:
        return tomllib.load(f)


def enrol_devices(directory: str | os.PathLike, client_ids: list[str], federation: str) -> dict[str, str]:
    """Enrol many devices at once (a fleet, a load test): one hashing pass and one ACL write.

    Returns {client_id: password}. Unlike `enrol_device`, no per-device credentials files are written.
    """
    paths = BrokerPaths(Path(directory).resolve())
    if federation not in BrokerSettings.load(paths.root).federations:
        raise ValueError(f"federation {federation!r} is not served by the broker in {paths.root}")
    passwords = {check_id(cid, "device name"): generate_password() for cid in client_ids}
    if not passwords:
        return {}
    principals = acl.load_principals(paths)
    for cid in passwords:
        acl.check_device_id(cid, principals)
    for cid in passwords:
        principals["device"][cid] = sorted(set(principals["device"].get(cid, [])) | {federation})
    acl.save_principals(paths, principals)
    batch = paths.root / ".passwd-batch"
    write_private(batch, "".join(f"{cid}:{pw}\n" for cid, pw in passwords.items()))
    result = subprocess.run([find_executable("mosquitto_passwd"), "-U", str(batch)], capture_output=True, text=True)
    if result.returncode != 0:
        batch.unlink(missing_ok=True)
        raise RuntimeError(f"mosquitto_passwd -U failed: {result.stderr.strip() or result.stdout.strip()}")
    kept = []
    if paths.password_file.exists():
        kept = [line for line in paths.password_file.read_text().splitlines()
                if line and line.split(":", 1)[0] not in passwords]
    paths.password_file.write_text("\n".join(kept + batch.read_text().splitlines()) + "\n")
    batch.unlink()
    acl.write_acl(paths)
    permissions.grant_broker_access(paths)
    return passwords
