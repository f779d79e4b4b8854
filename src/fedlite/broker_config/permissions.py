"""File ownership and modes so that Mosquitto, which drops root privileges, can read what it needs."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from fedlite.broker_config.config import BrokerPaths

BROKER_USER = "mosquitto"


def broker_account() -> pwd.struct_passwd | None:
    """The account mosquitto switches to when started as root (None when we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in (BROKER_USER, "nobody"):  # mosquitto falls back to nobody if its user is missing
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("neither user 'mosquitto' nor 'nobody' exists; mosquitto cannot drop privileges")


def _own(path: Path, account: pwd.struct_passwd | None, mode: int) -> None:
    if not path.exists():
        return
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)


def _can_traverse(path: Path, account: pwd.struct_passwd) -> bool:
    st = path.stat()
    if st.st_uid == account.pw_uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == account.pw_gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def check_reachable(directory: Path, account: pwd.struct_passwd) -> None:
    """Raise PermissionError if `account` cannot reach files inside `directory`."""
    for folder in [directory, *directory.parents]:
        if not _can_traverse(folder, account):
            raise PermissionError(
                f"mosquitto runs as user {account.pw_name!r} and cannot enter {folder} "
                f"(mode {folder.stat().st_mode & 0o777:o}); put the broker directory {directory} "
                "somewhere that user can reach (e.g. under /var/lib or /tmp), or `chmod o+x` that folder"
            )


def grant_broker_access(paths: BrokerPaths) -> None:
    """Give the broker read access to its password, ACL and TLS files and write access to data/ and run/.

    As root, these files are chowned to the `mosquitto` user (mode 0600 for secrets); otherwise the
    broker runs as us and only the modes are tightened. Generated client credentials and the CA key
    stay private to the caller.
    """
    account = broker_account()
    for password_file in (paths.password_file, paths.aggregator_password_file):
        _own(password_file, account, 0o600)
    for acl_file in (paths.acl_file, paths.aggregator_acl_file):
        _own(acl_file, account, 0o640)
    _own(paths.server_key, account, 0o600)
    _own(paths.server_cert, account, 0o644)
    _own(paths.ca_cert, account, 0o644)
    _own(paths.data, account, 0o750)
    for db in paths.data.glob("*"):
        _own(db, account, 0o600)
    _own(paths.run, account, 0o755)
    _own(paths.bridges, account, 0o700)
    for bridge in paths.bridges.glob("*.conf"):
        _own(bridge, account, 0o600)
    for private in [paths.credentials, *paths.credentials.glob("*")]:
        private.chmod(0o700 if private.is_dir() else 0o600)
    if account is not None:
        check_reachable(paths.root, account)
