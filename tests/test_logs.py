"""Service log lines: a syslog priority prefix when stderr is the journal, TensorFlow's chatter kept out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, os
from fedlite.logs import configure_logging
configure_logging("INFO")
log = logging.getLogger("fedlite.aggregator")
log.info("round 1 complete")
log.warning("a device left")
log.error("the model did not export")
logging.getLogger("tensorflow").info("Assets written to: /tmp/x/assets")
print("TF_CPP_MIN_LOG_LEVEL=" + os.environ["TF_CPP_MIN_LOG_LEVEL"], flush=True)
"""


def _run(tmp_path: Path, journal: bool) -> list[str]:
    out = tmp_path / f"stderr-{journal}.txt"
    with out.open("wb") as stream:
        st = os.fstat(stream.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID",
                                                                 "TF_CPP_MIN_LOG_LEVEL")}
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT], stdout=stream, stderr=stream, env=env, timeout=60, check=True)
    return out.read_text().splitlines()


def test_under_the_journal_each_line_carries_its_syslog_priority_and_tensorflow_info_is_dropped(tmp_path):
    lines = _run(tmp_path, journal=True)
    assert "<6>INFO fedlite.aggregator: round 1 complete" in lines
    assert "<4>WARNING fedlite.aggregator: a device left" in lines
    assert "<3>ERROR fedlite.aggregator: the model did not export" in lines  # what journalctl -p err shows
    assert not any("Assets written" in line for line in lines)
    assert "TF_CPP_MIN_LOG_LEVEL=2" in lines


def test_on_a_terminal_lines_have_their_time_and_no_prefix(tmp_path):
    lines = [line for line in _run(tmp_path, journal=False) if "fedlite.aggregator" in line]
    assert len(lines) == 3 and not any(line.startswith("<") for line in lines)
    assert lines[0][:4].isdigit()  # the timestamp (the journal adds its own)
