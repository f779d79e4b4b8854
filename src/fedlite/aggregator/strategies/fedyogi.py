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

import numpy as np

from fedlite.aggregator.strategies.fedadam import (
    FedAdamConfig,
    FedAdamState,
    adaptive_step,
    init_server,
    state_from_arrays,
    state_to_arrays,
)
from fedlite.aggregator.strategies.registry import OptimizerSpec, register_optimizer


@dataclass(frozen=True)
class FedYogiConfig(FedAdamConfig):
    """FedAdam's parameters and defaults (its own `[server.fedyogi]` table)."""


def yogi_second_moment(v: np.ndarray, d2: np.ndarray, beta2: np.float32) -> np.ndarray:
    """Yogi: v <- v - (1 - beta2) * Δ² * sign(v - Δ²)."""
    return v - (1 - beta2) * d2 * np.sign(v - d2)


def server_step(
    weights: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray], state: FedAdamState,
    config: FedYogiConfig = FedYogiConfig(),
) -> tuple[dict[str, np.ndarray], FedAdamState]:
    """One server update; returns new weights and a new state (the inputs are not modified)."""
    return adaptive_step(weights, mean_delta, state, config, yogi_second_moment)


register_optimizer(OptimizerSpec(
    "fedyogi", FedYogiConfig, init_server, server_step, state_to_arrays, state_from_arrays,
    citation="Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, \"Adaptive Federated Optimization\", "
             "ICLR 2021 (Algorithm 2, FedYogi)"))
