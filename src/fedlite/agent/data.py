"""Local training data on the device: .npz, CSV, a directory of shards, or a user's hook."""

from __future__ import annotations

import csv
import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlite.agent.dataspec import SOURCES, DataError, DataSpec

__all__ = ["SOURCES", "DataError", "DataSpec", "LocalData", "load_local_data", "split"]


@dataclass
class LocalData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def load_local_data(spec: DataSpec) -> LocalData:
    """Load the device's examples and split off a held-out part for on-device evaluation."""
    x, y = _load(spec)
    if len(x) != len(y):
        raise DataError(f"{len(x)} examples but {len(y)} labels in {spec.source} data")
    if len(x) == 0:
        raise DataError(f"no examples in {spec.source} data at {spec.path or spec.hook}")
    return split(np.asarray(x, np.float32), np.asarray(y).astype(np.int64), spec.holdout_fraction, spec.seed)


def split(x: np.ndarray, y: np.ndarray, holdout_fraction: float, seed: int) -> LocalData:
    order = np.random.default_rng(seed).permutation(len(x))
    n_hold = int(round(len(x) * holdout_fraction))
    if holdout_fraction > 0 and n_hold == 0 and len(x) > 1:
        n_hold = 1
    hold, train = order[:n_hold], order[n_hold:]
    return LocalData(x[train], y[train], x[hold], y[hold])


def _load(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    if spec.source == "npz":
        return _load_npz(Path(spec.path), spec)
    if spec.source == "csv":
        return _load_csv(Path(spec.path), spec.label_column)
    if spec.source == "shards":
        return _load_shards(Path(spec.path), spec)
    if spec.source == "hook":
        return _load_hook(spec.hook)
    raise DataError(f"data source must be one of {SOURCES}, not {spec.source!r}")


def _load_npz(path: Path, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[spec.features_key], data[spec.labels_key]
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except KeyError as exc:
        raise DataError(f"{path} has no array {exc}; expected {spec.features_key!r} and {spec.labels_key!r}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None


def _load_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    if not rows or label_column not in rows[0]:
        raise DataError(f"{path} needs a header row with a {label_column!r} column")
    label_at = rows[0].index(label_column)
    try:
        table = np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path} holds a value that is not a number: {exc}") from None
    if table.ndim != 2:
        raise DataError(f"{path} has rows of different lengths")
    return np.delete(table, label_at, axis=1).astype(np.float32), table[:, label_at].astype(np.int64)


def _load_shards(directory: Path, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """All shards the device's app has written so far (*.npz and *.csv), in name order."""
    if not directory.is_dir():
        raise DataError(f"shard directory {directory} does not exist")
    parts = []
    for shard in sorted(directory.iterdir()):
        if shard.suffix == ".npz":
            parts.append(_load_npz(shard, spec))
        elif shard.suffix == ".csv":
            parts.append(_load_csv(shard, spec.label_column))
    if not parts:
        raise DataError(f"no .npz or .csv shards in {directory}")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_hook(hook: str) -> tuple[np.ndarray, np.ndarray]:
    module_name, _, func_name = hook.partition(":")
    if not module_name or not func_name:
        raise DataError(f"data hook must look like 'package.module:function', not {hook!r}")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"cannot load data hook {hook!r}: {exc}") from None
    x, y = func()
    return np.asarray(x), np.asarray(y)
