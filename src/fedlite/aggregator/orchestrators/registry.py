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
_CONFIGS: dict[str, type] = {}


def register(name: str, make: Callable[[Any], Orchestrator], config: type | None = None) -> None:
    """Register `make(host)` as ``[rounds] mode = name``; `config`: its ``[rounds.<name>]`` table's dataclass."""
    if not name or name in _ORCHESTRATORS:
        raise ValueError(f"orchestrator name {name!r} is empty or already registered")
    _ORCHESTRATORS[name] = make
    if config is not None:
        _CONFIGS[name] = config


def names() -> list[str]:
    return sorted(_ORCHESTRATORS)


def config_types() -> dict[str, type]:
    """The ``[rounds.<name>]`` tables: each orchestrator's config dataclass, for those that have one."""
    return dict(sorted(_CONFIGS.items()))


def make(name: str, host: Any) -> Orchestrator:
    """The orchestrator `name` driving rounds for `host` (see `orchestrators.host.RoundHost`)."""
    if name not in _ORCHESTRATORS:
        raise ValueError(f"unknown rounds mode {name!r}; known: {', '.join(names())}")
    return _ORCHESTRATORS[name](host)
