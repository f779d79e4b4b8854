"""FedYogi: FedAdam with Yogi's additive second-moment update, a server optimizer over the round's mean delta.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization",
ICLR 2021 (Algorithm 2, FedYogi). With Δ the round's weighted mean delta (see `fedavg`):

    m <- beta1 * m + (1 - beta1) * Δ
    v <- v - (1 - beta2) * Δ² * sign(v - Δ²)
    w <- w + server_lr * m / (sqrt(v) + tau)

As for FedAdam (see `fedadam`, whose state layout it shares): no bias correction, v starts at tau², m at 0,
and the same defaults. FedAdam moves v towards Δ² by (1 - beta2) * |v - Δ²|, Yogi by (1 - beta2) * Δ²: after
large deltas, rounds of small ones shrink v (and so grow the step) slowly rather than geometrically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from fedlite.aggregator.strategies.fedadam import FedAdamState, state_from_arrays, state_to_arrays
from fedlite.aggregator.strategies.fedavg import check_delta
from fedlite.aggregator.strategies.registry import OptimizerSpec, register_optimizer
from fedlite.settings import Range


@dataclass(frozen=True)
class FedYogiConfig:
    server_lr: float = 1e-2
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Range(gt=0)] = 1e-3

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


def init_server(weights: dict[str, np.ndarray], config: FedYogiConfig = FedYogiConfig()) -> FedAdamState:
    m = {name: np.zeros(np.shape(w), np.float32) for name, w in weights.items()}
    v = {name: np.full(np.shape(w), config.tau**2, np.float32) for name, w in weights.items()}
    return FedAdamState(m, v)


def server_step(
    weights: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray], state: FedAdamState,
    config: FedYogiConfig = FedYogiConfig(),
) -> tuple[dict[str, np.ndarray], FedAdamState]:
    """One server update; returns new weights and a new state (the inputs are not modified)."""
    check_delta(weights, mean_delta)
    check_delta(weights, state.m)
    check_delta(weights, state.v)
    b1, b2 = np.float32(config.beta1), np.float32(config.beta2)
    lr, tau = np.float32(config.server_lr), np.float32(config.tau)
    m, v, new = {}, {}, {}
    for name, w in weights.items():
        d = np.asarray(mean_delta[name], np.float32)
        d2 = np.square(d)
        m[name] = (b1 * state.m[name] + (1 - b1) * d).astype(np.float32)
        v[name] = (state.v[name] - (1 - b2) * d2 * np.sign(state.v[name] - d2)).astype(np.float32)
        new[name] = (np.asarray(w, np.float32) + lr * m[name] / (np.sqrt(v[name]) + tau)).astype(np.float32)
    return new, FedAdamState(m, v, state.step + 1)


register_optimizer(OptimizerSpec(
    "fedyogi", FedYogiConfig, init_server, server_step, state_to_arrays, state_from_arrays,
    citation="Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, \"Adaptive Federated Optimization\", "
             "ICLR 2021 (Algorithm 2, FedYogi)"))
