"""Crash-safe round checkpoints: one directory per completed round, written atomically, never pickled.

Layout::

    <directory>/round-000012/arrays.safetensors   weights ("weights/<name>") and optimizer state ("optimizer/<key>")
    <directory>/round-000012/checkpoint.json      round, history, meta, and the sha256 of the arrays file

A checkpoint is written into a temporary directory inside `directory`, fsync'd, renamed into place in one
step, and only then are checkpoints beyond `keep` deleted; a failed write leaves the previous ones intact.
`load_latest` returns the newest checkpoint that verifies, skipping (with a warning) a corrupt or partial one.
One writer per directory is assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
ARRAYS_FILE = "arrays.safetensors"
META_FILE = "checkpoint.json"
_NAME = re.compile(r"^round-(\d{6,})$")
_TMP_PREFIX = ".tmp-"
_WEIGHTS, _OPTIMIZER = "weights/", "optimizer/"


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read."""


@dataclass
class Checkpoint:
    round: int  # the last completed round
    weights: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # JSON-able per-round records
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able: federation, model_hash, rng state, ...


def checkpoint_name(round_: int) -> str:
    return f"round-{round_:06d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint directory, oldest first; temporary directories are not listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    try:
        for entry in directory.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    except OSError as exc:  # not "no checkpoint": starting over silently would lose the federation's progress
        raise CheckpointError(f"cannot list checkpoints in {directory}: {exc.strerror or exc}") from exc
    return sorted(found)


def check_writable(directory: str | Path) -> None:
    """Raise CheckpointError unless a file can be created, written, synced and removed in `directory`."""
    directory = Path(directory)
    probe = directory / f".probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_durably(probe, b"fedlite checkpoint probe")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {exc}") from None


def save_checkpoint(directory: str | Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write `ckpt` as ``directory/round-NNNNNN`` atomically, then keep only the newest `keep` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if ckpt.round < 0:
        raise ValueError(f"round must be >= 0, got {ckpt.round}")
    directory = Path(directory)
    arrays_blob, meta_blob = _serialize(ckpt)
    final = directory / checkpoint_name(ckpt.round)
    tmp = directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        _write_durably(tmp / ARRAYS_FILE, arrays_blob)
        _write_durably(tmp / META_FILE, meta_blob)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        raise CheckpointError(f"cannot write the round {ckpt.round} checkpoint into {directory}: {cause}{where}; "
                              "the previous checkpoints are untouched") from exc
    _prune(directory, keep)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint directory; raises CheckpointError if it is missing, partial or corrupt."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        blob = (path / ARRAYS_FILE).read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown format")
    if not isinstance(meta.get("history"), list) or not isinstance(meta.get("meta"), dict):
        raise CheckpointError(f"checkpoint {path}: history must be a list and meta an object")
    if hashlib.sha256(blob).hexdigest() != meta.get("arrays_sha256"):
        raise CheckpointError(f"checkpoint {path}: {ARRAYS_FILE} does not match its recorded sha256 (corrupt)")
    try:
        arrays = load(blob)
        weights = {name: arrays[_WEIGHTS + name] for name in meta["weights"]}
        optimizer = {key: arrays[_OPTIMIZER + key] for key in meta["optimizer_state"]}
        return Checkpoint(int(meta["round"]), weights, optimizer, meta["history"], meta["meta"])
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is inconsistent: {type(exc).__name__}: {exc}") from None


def load_latest(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None if there is none."""
    for round_, path in reversed(list_checkpoints(directory)):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint of round %d: %s", round_, exc)
            continue
        if ckpt.round != round_:
            log.warning("skipping %s: it records round %d", path, ckpt.round)
            continue
        return ckpt
    return None


# --- internals ----------------------------------------------------------------------------------


def _serialize(ckpt: Checkpoint) -> tuple[bytes, bytes]:
    from safetensors.numpy import save

    tensors = {_WEIGHTS + name: np.asarray(value, order="C") for name, value in ckpt.weights.items()}
    tensors.update({_OPTIMIZER + key: np.asarray(value, order="C") for key, value in ckpt.optimizer_state.items()})
    try:
        arrays_blob = save(tensors)
    except Exception as exc:  # safetensors raises its own error types for unsupported dtypes
        raise CheckpointError(f"cannot serialize the round {ckpt.round} arrays: {exc}") from exc
    record = {"format": FORMAT, "round": ckpt.round, "weights": list(ckpt.weights),
              "optimizer_state": list(ckpt.optimizer_state), "history": ckpt.history, "meta": ckpt.meta,
              "arrays_sha256": hashlib.sha256(arrays_blob).hexdigest()}
    try:
        meta_blob = json.dumps(record, indent=1).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"round {ckpt.round} history/meta is not JSON-serializable: {exc}") from exc
    return arrays_blob, meta_blob


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same round saved again) is swapped out first."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _prune(directory: Path, keep: int) -> None:
    """Delete checkpoints beyond the newest `keep`, and temporaries left by interrupted saves."""
    try:
        for _, path in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(path)
        for entry in directory.iterdir():
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry)
    except (OSError, CheckpointError) as exc:  # the new checkpoint is in place; an old one lingering is harmless
        log.warning("could not prune old checkpoints in %s: %s", directory, exc)
