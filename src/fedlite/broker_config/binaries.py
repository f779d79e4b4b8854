"""Locating the Mosquitto executables."""

from __future__ import annotations

import os
import shutil

SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")


def find_executable(name: str) -> str:
    """Path of `name` from PATH or the usual sbin/bin folders; FileNotFoundError says how to install it."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SEARCH_DIRS))
    if not found:
        raise FileNotFoundError(
            f"{name} not found in PATH or {', '.join(SEARCH_DIRS)}; install Mosquitto "
            "(Debian / Raspberry Pi OS: sudo apt-get install mosquitto)"
        )
    return found
