"""The aggregator's state directory: its layout, the refusal to start over on a state that has progress but no
valid checkpoint, and `fedlite aggregator --reset`, which moves that progress aside."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

from fedlite.aggregator.checkpoint import Checkpoint, ResumeRefused, cause, list_checkpoints, load_latest
from fedlite.fsutil import StorageError, describe, ensure_dir, fsync_dir

# The aggregator's state directory.
CHECKPOINTS_DIR = "checkpoints"
MODELS_DIR = "models"
HISTORY_FILE = "history.json"
# What `reset_state` moves aside besides the checkpoints and the exported rounds (not models/round-00000, the
# initial model, nor lock files): the history, the registry with its deployment log, and the dashboard's files.
_STATE_FILES = (HISTORY_FILE, "registry.json", "deployments.jsonl", "rollout.heartbeat", "fleet.json",
                "run.json")  # run.json: a reset begins a new run, which agents follow
_EXPORT_DIR = re.compile(r"^round-(\d{5,})$")


def load_for_resume(directory: str | Path, history_file: str | Path) -> Checkpoint | None:
    """The newest valid checkpoint; None for a fresh state (no checkpoint directories, no completed round in
    `history_file`); ResumeRefused for a state with a history but no valid checkpoint, which must not silently
    start over at round 1."""
    ckpt = load_latest(directory)
    if ckpt is not None:
        return ckpt
    evidence = []
    failed = [r for r, _ in list_checkpoints(directory)]
    if failed:
        evidence.append(f"the checkpoint of round {failed[0]} fails to verify" if len(failed) == 1
                        else f"the checkpoints of rounds {_rounds(failed)} fail to verify")
    completed = _completed_rounds(Path(history_file))
    if completed:
        evidence.append(f"{history_file} records {completed}")
    if not evidence:
        return None
    raise ResumeRefused(f"no valid checkpoint in {directory}, but {' and '.join(evidence)}: refusing to start the "
                        "federation over at round 1; restore a checkpoint, or start once with "
                        "`fedlite aggregator --reset` to move the old state aside and begin again")


def reset_state(state_dir: str | Path) -> tuple[Path, list[str]] | None:
    """Move an aggregator state directory's progress aside, into ``state_dir/previous-<time>/``: the checkpoints,
    the exported rounds (models/round-NNNNN, N >= 1), the history, the registry with its deployment log and the
    dashboard's files. The initial model (models/round-00000) stays. Returns the folder and what was moved,
    or None when there was nothing to move."""
    state_dir = Path(state_dir)
    models = state_dir / MODELS_DIR
    moves = [name for name in (CHECKPOINTS_DIR, *_STATE_FILES) if os.path.lexists(state_dir / name)]
    try:
        exports = sorted(f"{MODELS_DIR}/{entry.name}" for entry in (models.iterdir() if models.is_dir() else ())
                         if (match := _EXPORT_DIR.match(entry.name)) and int(match.group(1)) >= 1)
        if not moves and not exports:
            return None
        aside = state_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        while aside.exists():
            aside = aside.with_name(f"{aside.name}-{uuid.uuid4().hex[:4]}")
        ensure_dir(aside / MODELS_DIR if exports else aside)
        for name in [*moves, *exports]:
            os.rename(state_dir / name, aside / name)
        if exports:
            fsync_dir(models)
            fsync_dir(aside / MODELS_DIR)
        fsync_dir(aside)
        fsync_dir(state_dir)
    except OSError as exc:
        raise StorageError(f"cannot move the previous state of {state_dir} aside: {cause(exc)}") from exc
    moved = [*moves, *(_summary(exports) if exports else [])]
    return aside, moved


def _rounds(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers)) if len(numbers) <= 6 else f"{numbers[0]} to {numbers[-1]}"


def _summary(exports: list[str]) -> list[str]:
    return exports if len(exports) <= 3 else [f"{exports[0]} .. {exports[-1].split('/')[-1]} ({len(exports)})"]


def _completed_rounds(history_file: Path) -> str:
    """"3 completed rounds" (or why the history cannot be read); "" for no history."""
    try:
        raw = history_file.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"a history that cannot be read ({describe(exc)})"
    try:
        records = json.loads(raw)
    except ValueError:
        return "a history that does not parse" if raw.strip() else ""
    if not isinstance(records, list):
        return "a history that is not a list of rounds"
    done = sorted({r["round"] for r in records if isinstance(r, dict) and r.get("status") == "complete"
                   and isinstance(r.get("round"), int)})
    return f"{len(done)} completed round{'s' if len(done) != 1 else ''} (last: {done[-1]})" if done else ""
