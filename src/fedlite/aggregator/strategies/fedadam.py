"""FedAdam: an Adam server optimizer over the round's mean delta.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization",
ICLR 2021 (Algorithm 2). With Δ the round's weighted mean delta (see `fedavg`):

    m <- beta1 * m + (1 - beta1) * Δ
    v <- beta2 * v + (1 - beta2) * Δ²
    w <- w + server_lr * m / (sqrt(v) + tau)

As in the paper there is no bias correction and v starts at tau² (the paper requires v_{-1} >= tau²), m at 0.
Defaults are the paper's fixed values beta1 = 0.9, beta2 = 0.99, and tau = 1e-3 and server_lr = 1e-2, which
sit in the middle of its tuning grids (tau in 1e-5..1e-1, server_lr in 1e-3..1); both are worth tuning per
task. Adaptivity makes the step per coordinate roughly server_lr in size, independent of Δ's scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from fedlite.aggregator.strategies.fedavg import check_delta
from fedlite.aggregator.strategies.registry import OptimizerSpec, register_optimizer
from fedlite.settings import Range


@dataclass(frozen=True)
class FedAdamConfig:
    server_lr: float = 1e-2
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Range(gt=0)] = 1e-3

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


@dataclass
class FedAdamState:
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int = 0


def init_server(weights: dict[str, np.ndarray], config: FedAdamConfig = FedAdamConfig()) -> FedAdamState:
    m = {name: np.zeros(np.shape(w), np.float32) for name, w in weights.items()}
    v = {name: np.full(np.shape(w), config.tau**2, np.float32) for name, w in weights.items()}
    return FedAdamState(m, v)


def server_step(
    weights: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray], state: FedAdamState,
    config: FedAdamConfig = FedAdamConfig(),
) -> tuple[dict[str, np.ndarray], FedAdamState]:
    """One server update; returns new weights and a new state (the inputs are not modified)."""
    return adaptive_step(weights, mean_delta, state, config, adam_second_moment)


def adam_second_moment(v: np.ndarray, d2: np.ndarray, beta2: np.float32) -> np.ndarray:
    """Adam: v <- beta2 * v + (1 - beta2) * Δ²."""
    return beta2 * v + (1 - beta2) * d2


SecondMoment = Callable[[np.ndarray, np.ndarray, np.float32], np.ndarray]


def adaptive_step(
    weights: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray], state: FedAdamState, config: FedAdamConfig,
    second_moment: SecondMoment,
) -> tuple[dict[str, np.ndarray], FedAdamState]:
    """The adaptive server step of Reddi et al. (Algorithm 2), with the second-moment update as a parameter."""
    check_delta(weights, mean_delta)
    check_delta(weights, state.m)
    check_delta(weights, state.v)
    b1, b2 = np.float32(config.beta1), np.float32(config.beta2)
    lr, tau = np.float32(config.server_lr), np.float32(config.tau)
    m, v, new = {}, {}, {}
    for name, w in weights.items():
        d = np.asarray(mean_delta[name], np.float32)
        m[name] = (b1 * state.m[name] + (1 - b1) * d).astype(np.float32)
        v[name] = second_moment(state.v[name], np.square(d), b2).astype(np.float32)
        new[name] = (np.asarray(w, np.float32) + lr * m[name] / (np.sqrt(v[name]) + tau)).astype(np.float32)
    return new, FedAdamState(m, v, state.step + 1)


def state_to_arrays(state: FedAdamState) -> dict[str, np.ndarray]:
    arrays = {f"m/{name}": value for name, value in state.m.items()}
    arrays.update({f"v/{name}": value for name, value in state.v.items()})
    arrays["step"] = np.array(state.step, dtype=np.int64)
    return arrays


def state_from_arrays(arrays: dict[str, np.ndarray]) -> FedAdamState:
    if "step" not in arrays:
        raise ValueError("FedAdam state arrays lack 'step'")
    m = {k.removeprefix("m/"): np.array(a, np.float32) for k, a in arrays.items() if k.startswith("m/")}
    v = {k.removeprefix("v/"): np.array(a, np.float32) for k, a in arrays.items() if k.startswith("v/")}
    if set(m) != set(v):
        raise ValueError("FedAdam state arrays have different names for m and v")
    return FedAdamState(m, v, int(arrays["step"]))


register_optimizer(OptimizerSpec(
    "fedadam", FedAdamConfig, init_server, server_step, state_to_arrays, state_from_arrays,
    citation="Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, \"Adaptive Federated Optimization\", "
             "ICLR 2021 (Algorithm 2, FedAdam)"))
