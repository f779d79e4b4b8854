"""The round orchestrators by name (``[rounds] mode``): how a run turns devices' updates into new versions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fedlite.aggregator.rounds import RoundOutcome

Weights = dict[str, np.ndarray]


class Orchestrator(Protocol):
    """Runs one attempt at one version: selects, announces, collects until its rule closes it."""

    def attempt(self, number: int, attempt: int, weights: Weights) -> RoundOutcome | None:
        """The closed attempt's outcome, or None when the aggregator is stopping."""
        ...


_ORCHESTRATORS: dict[str, Callable[[Any], Orchestrator]] = {}


def register(name: str, make: Callable[[Any], Orchestrator]) -> None:
    if not name or name in _ORCHESTRATORS:
        raise ValueError(f"orchestrator name {name!r} is empty or already registered")
    _ORCHESTRATORS[name] = make


def names() -> list[str]:
    return sorted(_ORCHESTRATORS)


def make(name: str, host: Any) -> Orchestrator:
    """The orchestrator `name` driving rounds for `host` (see `orchestrators.host.RoundHost`)."""
    if name not in _ORCHESTRATORS:
        raise ValueError(f"unknown rounds mode {name!r}; known: {', '.join(names())}")
    return _ORCHESTRATORS[name](host)
