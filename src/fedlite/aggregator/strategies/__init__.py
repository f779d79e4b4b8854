"""Server-side aggregation strategies, one per module, and the two factories the round code uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedlite.aggregator.strategies import fedadam, fedavg, fedavgm, robust

Specs = list[tuple[str, tuple[int, ...]]]
AGGREGATORS = ("mean", "trimmed_mean", "median")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


class Aggregator(Protocol):
    """Folds client deltas into one aggregated delta for the round."""

    def add(self, delta: dict[str, np.ndarray], weight: float) -> None: ...

    @property
    def count(self) -> int: ...

    def result(self) -> dict[str, np.ndarray]: ...


def make_aggregator(kind: str, specs: Specs, trim_fraction: float = 0.1, sum_dtype: str = "float64") -> Aggregator:
    """"mean" streams in O(model) memory; "trimmed_mean" and "median" hold every update (O(N * model)).

    `sum_dtype` ("float64" | "float32") is the streaming mean's accumulator type; see `fedavg.init`.
    """
    if kind == "mean":
        return fedavg.MeanAggregator(specs, sum_dtype)
    if kind == "trimmed_mean":
        return robust.TrimmedMeanAggregator(specs, trim_fraction)
    if kind == "median":
        return robust.MedianAggregator(specs)
    raise ValueError(f"unknown aggregator {kind!r}; choose one of {', '.join(AGGREGATORS)}")


@dataclass(frozen=True)
class ServerOptimizer:
    """Binds one optimizer module's pure functions to its config."""

    name: str
    config: Any
    _init: Callable[..., Any]
    _step: Callable[..., tuple[dict[str, np.ndarray], Any]]
    _to_arrays: Callable[[Any], dict[str, np.ndarray]]
    _from_arrays: Callable[[dict[str, np.ndarray]], Any]

    def init(self, weights: dict[str, np.ndarray]) -> Any:
        return self._init(weights)

    def step(self, weights: dict[str, np.ndarray], delta: dict[str, np.ndarray], state: Any
             ) -> tuple[dict[str, np.ndarray], Any]:
        return self._step(weights, delta, state, self.config)

    def state_to_arrays(self, state: Any) -> dict[str, np.ndarray]:
        return self._to_arrays(state)

    def state_from_arrays(self, arrays: dict[str, np.ndarray]) -> Any:
        return self._from_arrays(arrays)


def make_server_optimizer(name: str, **params: Any) -> ServerOptimizer:
    """`name` is "fedavg" | "fedavgm" | "fedadam"; `params` are its config fields (e.g. server_lr=0.1).

    ``learning_rate`` is accepted as another name for ``server_lr``.
    """
    if "learning_rate" in params:
        if "server_lr" in params:
            raise ValueError("give server_lr or learning_rate, not both")
        params = {**params, "server_lr": params["learning_rate"]}
        del params["learning_rate"]
    modules = {"fedavg": (fedavg, fedavg.FedAvgConfig), "fedavgm": (fedavgm, fedavgm.FedAvgMConfig),
               "fedadam": (fedadam, fedadam.FedAdamConfig)}
    if name not in modules:
        raise ValueError(f"unknown server optimizer {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}")
    module, config_cls = modules[name]
    try:
        config = config_cls(**params)
    except TypeError:
        fields = ", ".join(config_cls.__dataclass_fields__)
        raise ValueError(f"{name} takes parameters {fields}; got {', '.join(sorted(params))}") from None
    init = (lambda weights: fedadam.init_server(weights, config)) if name == "fedadam" else module.init_server
    return ServerOptimizer(name, config, init, module.server_step, module.state_to_arrays, module.state_from_arrays)
