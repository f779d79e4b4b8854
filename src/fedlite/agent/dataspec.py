"""Where the device's training data lives (`[data]`): the spec the agent keeps, and the error when it cannot load."""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("npz", "csv", "shards", "hook")


class DataError(ValueError):
    """Local data that cannot be loaded; the message says what to fix."""


@dataclass
class DataSpec:
    source: str = "npz"
    path: str = ""
    features_key: str = "x"
    labels_key: str = "y"
    label_column: str = "label"
    hook: str = ""
    holdout_fraction: float = 0.2
    seed: int = 0
