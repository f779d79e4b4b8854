"""Log lines for services: plain lines that read well in journalctl (the journal adds the timestamps)."""

from __future__ import annotations

import logging
import os
import sys


def configure_logging(level: str) -> None:
    under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
