"""The strategy registries: server optimizers and reducers by name, each with its config dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Specs = list[tuple[str, tuple[int, ...]]]
Arrays = dict[str, np.ndarray]


class Aggregator(Protocol):
    """Folds client deltas into one aggregated delta for the round.

    `fresh` is an empty aggregator of the same rule (a worker's partial) and `absorb` folds such a partial in,
    so that partials filled in parallel and absorbed at close give the result one aggregator would have.
    """

    def add(self, delta: Arrays, weight: float) -> None: ...

    def fresh(self) -> Aggregator: ...

    def absorb(self, other: Aggregator) -> None: ...

    @property
    def count(self) -> int: ...

    def result(self) -> Arrays: ...


@dataclass(frozen=True)
class OptimizerSpec:
    """A server optimizer as pure functions over its state, like FedJAX's algorithms: ``init(weights, config)``
    and ``step(weights, mean_delta, state, config) -> (new weights, new state)``, neither modifying its inputs.

    `config` is a frozen dataclass: its fields, with the bounds they declare, are the keys of the
    ``[server.<name>]`` table, except ``server_lr``, which ``[server] learning_rate`` sets for every optimizer.
    """

    name: str
    config: type
    init: Callable[[Arrays, Any], Any]
    step: Callable[[Arrays, Arrays, Any, Any], tuple[Arrays, Any]]
    state_to_arrays: Callable[[Any], Arrays]  # flat, safetensors-ready: the checkpoint's optimizer state
    state_from_arrays: Callable[[Arrays], Any]
    citation: str


@dataclass(frozen=True)
class ReducerSpec:
    """An aggregation rule: ``make(specs, config)`` is a fresh `Aggregator` for one round.

    `streaming`: True if it folds each update into O(model) memory, False if it holds every update (O(N * model)).
    """

    name: str
    config: type
    make: Callable[[Specs, Any], Aggregator]
    streaming: bool
    citation: str


@dataclass(frozen=True)
class ServerOptimizer:
    """One optimizer bound to its config: what a run steps with."""

    spec: OptimizerSpec
    config: Any

    @property
    def name(self) -> str:
        return self.spec.name

    def init(self, weights: Arrays) -> Any:
        return self.spec.init(weights, self.config)

    def step(self, weights: Arrays, delta: Arrays, state: Any) -> tuple[Arrays, Any]:
        return self.spec.step(weights, delta, state, self.config)

    def state_to_arrays(self, state: Any) -> Arrays:
        return self.spec.state_to_arrays(state)

    def state_from_arrays(self, arrays: Arrays) -> Any:
        return self.spec.state_from_arrays(arrays)


_OPTIMIZERS: dict[str, OptimizerSpec] = {}
_REDUCERS: dict[str, ReducerSpec] = {}


def _register(spec: OptimizerSpec | ReducerSpec, into: dict[str, Any]) -> None:
    if not dataclasses.is_dataclass(spec.config):
        raise TypeError(f"strategy {spec.name!r}: config must be a dataclass, not {spec.config!r}")
    if spec.name in _OPTIMIZERS or spec.name in _REDUCERS:  # one namespace: both name a [server.<name>] table
        raise ValueError(f"a strategy named {spec.name!r} is already registered")
    into[spec.name] = spec


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    _register(spec, _OPTIMIZERS)
    return spec


def register_reducer(spec: ReducerSpec) -> ReducerSpec:
    _register(spec, _REDUCERS)
    return spec


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def reducer_names() -> list[str]:
    return sorted(_REDUCERS)


def optimizer(name: str) -> OptimizerSpec:
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(optimizer_names())}")
    return _OPTIMIZERS[name]


def reducer(name: str) -> ReducerSpec:
    if name not in _REDUCERS:
        raise ValueError(f"unknown aggregation {name!r}; known: {', '.join(reducer_names())}")
    return _REDUCERS[name]


def config_types() -> dict[str, type]:
    """Every registered strategy's config dataclass by name: the ``[server.<name>]`` tables."""
    return {name: spec.config for name, spec in sorted({**_OPTIMIZERS, **_REDUCERS}.items())}


def configure(spec: OptimizerSpec | ReducerSpec, params: dict[str, Any]) -> Any:
    """`spec`'s config from keyword parameters, with a ValueError naming its fields if one is unknown."""
    try:
        return spec.config(**params)
    except TypeError:
        fields = ", ".join(f.name for f in dataclasses.fields(spec.config))
        takes = f"parameters {fields}" if fields else "no parameters"
        raise ValueError(f"{spec.name} takes {takes}; got {', '.join(sorted(params))}") from None
