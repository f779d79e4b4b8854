"""Crash-safe round checkpoints: one directory per completed round, written atomically, never pickled.

Layout::

    <directory>/round-000012/arrays.safetensors   weights ("weights/<name>") and optimizer state ("optimizer/<key>")
    <directory>/round-000012/checkpoint.json      round, history, meta, and the sha256 of the arrays file

A checkpoint is written into a temporary directory inside `directory`, fsync'd, renamed into place in one
step, and only then is the directory pruned: the checkpoint just written and the newest others that verify,
`keep` in all, stay and older ones are deleted; one that fails to verify is renamed ``corrupt-round-NNNNNN-*``
(kept for inspection, never loaded). A failed write leaves the previous ones intact. `load_latest` returns the
newest checkpoint that verifies, skipping (with a warning) a corrupt or partial one (`state_dir` builds the resume
refusal on it). One writer per directory is assumed.
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

from fedlite.fsutil import StorageError, describe, ensure_dir, fsync_dir, write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
ARRAYS_FILE = "arrays.safetensors"
META_FILE = "checkpoint.json"
_NAME = re.compile(r"^round-(\d{6,})$")
_TMP_PREFIX = ".tmp-"
_CORRUPT_PREFIX = "corrupt-"
_WEIGHTS, _OPTIMIZER = "weights/", "optimizer/"



class CheckpointError(StorageError):
    """A checkpoint that cannot be written or read."""


class ResumeRefused(CheckpointError):
    """The state directory has a history but no checkpoint to resume it from."""


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
        ensure_dir(directory)
        write_atomic(probe, b"fedlite checkpoint probe")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {cause(exc)}") from exc


def save_checkpoint(directory: str | Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write `ckpt` as ``directory/round-NNNNNN`` atomically, then prune to it and the newest valid others,
    `keep` in all."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if ckpt.round < 0:
        raise ValueError(f"round must be >= 0, got {ckpt.round}")
    directory = Path(directory)
    arrays_blob, meta_blob = _serialize(ckpt)
    final = directory / checkpoint_name(ckpt.round)
    tmp = directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        ensure_dir(directory)
        tmp.mkdir()
        write_atomic(tmp / ARRAYS_FILE, arrays_blob)  # each also fsyncs tmp
        write_atomic(tmp / META_FILE, meta_blob)
        _replace_dir(tmp, final)
        fsync_dir(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the round {ckpt.round} checkpoint into {directory}: {cause(exc)}; "
                              "the previous checkpoints are untouched") from exc
    _prune(directory, keep, final)
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


def verify(round_: int, path: Path) -> Checkpoint:
    """`load_checkpoint`, also checking that the checkpoint records the round its directory is named after."""
    ckpt = load_checkpoint(path)
    if ckpt.round != round_:
        raise CheckpointError(f"checkpoint {path} records round {ckpt.round}")
    return ckpt


def load_latest(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None if there is none."""
    for round_, path in reversed(list_checkpoints(directory)):
        try:
            return verify(round_, path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint of round %d: %s", round_, exc)
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


def cause(exc: OSError) -> str:
    """What went wrong and where: "File too large (/state/checkpoints/.tmp-round-000002-ab12/arrays.safetensors)"."""
    if isinstance(exc, StorageError) and exc.cause is not None:
        where = exc.path or exc.cause.filename
        return describe(exc.cause) + (f" ({where})" if where else "")
    if isinstance(exc, StorageError):
        return str(exc)
    return describe(exc) + (f" ({exc.filename})" if exc.filename else "")


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


def _prune(directory: Path, keep: int, written: Path) -> None:
    """Keep `written` and the newest valid others up to `keep` in all, and delete what is older; quarantine the
    candidates that fail to verify (renamed ``corrupt-...``, not deleted); remove temporaries of interrupted saves.

    Validity, not the round number alone, decides: a newer checkpoint that is corrupt never pushes out the one
    just written or the last good ones.
    """
    try:
        kept = 1
        for round_, path in reversed(list_checkpoints(directory)):
            if path == written:
                continue
            if kept >= keep:  # older than the `keep` newest valid ones, valid or not
                shutil.rmtree(path)
                continue
            try:
                verify(round_, path)
                kept += 1
            except CheckpointError as exc:
                quarantine = directory / f"{_CORRUPT_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
                os.rename(path, quarantine)
                log.warning("checkpoint of round %d fails to verify (%s); moved aside to %s", round_, exc, quarantine)
        for entry in directory.iterdir():
            if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry)
        fsync_dir(directory)
    except OSError as exc:  # the new checkpoint is in place; an old one lingering is harmless
        log.warning("could not prune old checkpoints in %s: %s", directory, exc)
