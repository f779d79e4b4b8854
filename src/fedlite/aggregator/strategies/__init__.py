"""Server-side aggregation strategies, one per module registering itself, and the two lookups the round code uses."""

from __future__ import annotations

from typing import Any

# The built-in strategies register themselves on import (see `registry`).
from fedlite.aggregator.strategies import fedadam, fedavg, fedavgm, fedyogi, robust  # noqa: F401
from fedlite.aggregator.strategies.registry import Aggregator, ServerOptimizer, Specs, configure, optimizer, reducer

__all__ = ["Aggregator", "ServerOptimizer", "Specs", "make_aggregator", "make_server_optimizer"]


def make_aggregator(kind: str, specs: Specs, *, config: Any = None, **params: Any) -> Aggregator:
    """A fresh aggregator of the registered reducer `kind`, from its `config` or from that config's fields
    as keywords (e.g. ``make_aggregator("trimmed_mean", specs, trim_fraction=0.2)``)."""
    spec = reducer(kind)
    return spec.make(specs, _config(spec, config, params))


def make_server_optimizer(name: str, *, config: Any = None, **params: Any) -> ServerOptimizer:
    """The registered optimizer `name` bound to its `config`, or to that config's fields as keywords
    (e.g. ``server_lr=0.1``; ``learning_rate`` is another name for ``server_lr``)."""
    if "learning_rate" in params:
        if "server_lr" in params:
            raise ValueError("give server_lr or learning_rate, not both")
        params["server_lr"] = params.pop("learning_rate")
    spec = optimizer(name)
    return ServerOptimizer(spec, _config(spec, config, params))


def _config(spec: Any, config: Any, params: dict[str, Any]) -> Any:
    if config is None:
        return configure(spec, params)
    if params:
        raise ValueError(f"give {spec.name} a config or keyword parameters, not both")
    if not isinstance(config, spec.config):
        raise TypeError(f"{spec.name} needs a {spec.config.__name__}, not {type(config).__name__}")
    return config
