"""The run's identity: a random id and start time per state directory, and an epoch counted per process start.

Agents order announcements by (epoch, round) within a run, so an aggregator that restarts from an older
checkpoint (a higher epoch, a lower round) is still followed, and a new run (a new state directory, or
``--reset``) with a later start time supersedes the previous one.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedlite.fsutil import write_atomic

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunIdentity:
    run: str  # 128 random bits, hex
    started_at: float  # unix seconds when the run began
    epoch: int  # 1 for the run's first process, +1 at every restart

    @classmethod
    def start(cls, state_dir: Path) -> RunIdentity:
        """Load the state directory's run (or begin one) and count this process start as a new epoch."""
        path = state_dir / RUN_FILE
        try:
            raw = json.loads(path.read_text())
            current = cls(str(raw["run"]), float(raw["started_at"]), int(raw["epoch"]))
        except FileNotFoundError:
            current = cls(secrets.token_hex(16), time.time(), 0)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); move it aside to begin a new run") from None
        following = cls(current.run, current.started_at, current.epoch + 1)
        write_atomic(path, json.dumps(asdict(following)).encode())
        return following
