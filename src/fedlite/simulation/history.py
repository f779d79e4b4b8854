"""A simulated run's history as one typed value: its round records, accuracy and traffic, and plain rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlite.aggregator.record import RoundRecord

ROW_FIELDS = ("round", "status", "selected", "accepted", "rejected", "accuracy", "loss", "bytes_up", "bytes_down",
              "duration_seconds")


@dataclass(frozen=True)
class History:
    """What `fedlite.simulation.run` returns: every round attempt's `RoundRecord` (failed and abandoned ones
    included, as in the aggregator's history.json), the accuracy before round 1, and the final global weights."""

    rounds: tuple[RoundRecord, ...]
    mode: str  # in-process | processes
    codec: str
    strategy: str
    clients: int
    seconds: float
    initial_accuracy: float | None = None
    weights: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def complete(self) -> list[RoundRecord]:
        """The committed rounds, in order."""
        return [r for r in self.rounds if r.complete]

    @property
    def accuracies(self) -> list[float | None]:
        """The server-side test accuracy after each committed round."""
        return [r.accuracy for r in self.complete]

    @property
    def final_accuracy(self) -> float | None:
        """The accuracy after the last committed round (None: no round committed, or no test set)."""
        complete = self.complete
        return complete[-1].accuracy if complete else None

    @property
    def bytes_up(self) -> int:
        """Update payload bytes the aggregator received over the run (refused ones included)."""
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        """Payload bytes the devices whose updates were accepted say they received for their rounds."""
        return sum(r.bytes_down for r in self.rounds)

    def as_rows(self) -> list[dict[str, Any]]:
        """One plain dict per round attempt (`ROW_FIELDS`; `rejected` is the count of refused updates), ready for
        printing, csv.DictWriter or a data frame."""
        return [{name: r.rejected_total if name == "rejected" else getattr(r, name) for name in ROW_FIELDS}
                for r in self.rounds]
