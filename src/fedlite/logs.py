"""Log lines for services: plain lines that read well in journalctl (the journal adds the timestamps, and reads
each line's syslog priority from its `<N>` prefix, so `journalctl -p err` shows the errors)."""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3): the prefix journald reads on a stream (SyslogLevelPrefix=yes, the default)
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# libraries whose INFO lines say nothing to an operator (TensorFlow's export chatter: "Assets written to ...")
QUIET = ("tensorflow", "absl", "h5py")


class JournalFormatter(logging.Formatter):
    """`<priority>` before each line, for journald."""

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelno, 3 if record.levelno > logging.WARNING else 6)
        return f"<{priority}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def configure_logging(level: str) -> None:
    # TensorFlow's C++ INFO and WARNING lines (read when it is imported: set before that, if not set already)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    journal = stderr_is_journal()
    under_systemd = journal or bool(os.environ.get("INVOCATION_ID"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(fmt) if journal else logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    if logging.getLevelName(level) != logging.DEBUG:
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
