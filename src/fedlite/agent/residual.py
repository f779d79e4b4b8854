"""Error-feedback residuals: what the codec left out of this device's last update, kept across restarts."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.fsutil import StorageError, write_npz
from fedlite.protocol.codecs.ternary_ef import MAX_RESIDUAL_AGE

log = logging.getLogger("fedlite.agent")
FILE = "residual.npz"
_META = "__meta__"


@dataclass(frozen=True)
class ResidualKey:
    """Whose residual it is: a residual only carries over within one run, model and encoding."""

    run: str
    model_hash: str
    encoding: str
    round: int  # the round of the update it was left over from


class ResidualStore:
    """One residual per device (the agent's state dir) and model, written atomically after each sent update.

    `load` returns it only for the same run, model and encoding, and when it is at most `max_age` rounds old:
    a device that skips rounds keeps its residual (what it has not sent yet is still owed to the model), but
    one older than `max_age` rounds is dropped, as is one from a later round (a rollback) or another run.
    """

    def __init__(self, path: Path, max_age: int = MAX_RESIDUAL_AGE) -> None:
        self.path = path
        self.max_age = max_age
        self._staged: tuple[ResidualKey, dict[str, np.ndarray]] | None = None

    def load(self, key: ResidualKey) -> dict[str, np.ndarray] | None:
        stored = self._read()
        if stored is None:
            return None
        have, arrays = stored
        age = key.round - have.round
        if (have.run, have.model_hash, have.encoding) != (key.run, key.model_hash, key.encoding):
            why = "a new run" if have.run != key.run else "a new model" if have.model_hash != key.model_hash else \
                "a new encoding"
        elif not 0 <= age <= self.max_age:
            why = f"it is {age} rounds old (kept for at most {self.max_age})" if age > 0 else "the round went back"
        else:
            return arrays
        log.info("error-feedback residual of round %d reset: %s", have.round, why)
        self.clear()
        return None

    def stage(self, key: ResidualKey, residual: dict[str, np.ndarray] | None) -> None:
        """Hold the new residual until the update that left it has been sent (`commit`)."""
        self._staged = None if residual is None else (key, residual)

    def commit(self) -> None:
        if self._staged is None:
            return
        key, residual = self._staged
        self._staged = None
        try:
            write_npz(self.path, {_META: np.array(json.dumps(asdict(key))), **residual})
        except StorageError as exc:  # the next update then starts without feedback; training goes on
            log.warning("error-feedback residual not saved: %s", exc)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _read(self) -> tuple[ResidualKey, dict[str, np.ndarray]] | None:
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta: dict[str, Any] = json.loads(str(data[_META]))
                arrays = {name: data[name].astype(np.float32) for name in data.files if name != _META}
            return ResidualKey(str(meta["run"]), str(meta["model_hash"]), str(meta["encoding"]),
                               int(meta["round"])), arrays
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("error-feedback residual %s is unreadable (%s): starting without one", self.path, exc)
            self.clear()
            return None
