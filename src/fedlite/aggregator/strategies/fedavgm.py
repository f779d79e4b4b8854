"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", arXiv:1909.06335, 2019. With Δ the round's weighted mean delta (see `fedavg`):

    v <- momentum * v + Δ
    w <- w + server_lr * v

Defaults: momentum 0.9 and server_lr 1.0. The paper notes that what matters is the effective rate
server_lr / (1 - momentum); lower server_lr when raising momentum if training oscillates (e.g. 0.1 with 0.9
keeps the effective rate of plain FedAvg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from fedlite.aggregator.strategies.fedavg import check_delta
from fedlite.aggregator.strategies.registry import OptimizerSpec, register_optimizer
from fedlite.settings import Range

_PREFIX = "momentum/"


@dataclass(frozen=True)
class FedAvgMConfig:
    server_lr: float = 1.0
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass
class FedAvgMState:
    velocity: dict[str, np.ndarray]
    step: int = 0


def init_server(weights: dict[str, np.ndarray], config: FedAvgMConfig = FedAvgMConfig()) -> FedAvgMState:
    return FedAvgMState({name: np.zeros(np.shape(w), np.float32) for name, w in weights.items()})


def server_step(
    weights: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray], state: FedAvgMState,
    config: FedAvgMConfig = FedAvgMConfig(),
) -> tuple[dict[str, np.ndarray], FedAvgMState]:
    """One server update; returns new weights and a new state (the inputs are not modified)."""
    check_delta(weights, mean_delta)
    check_delta(weights, state.velocity)
    beta, lr = np.float32(config.momentum), np.float32(config.server_lr)
    velocity = {name: (beta * state.velocity[name] + np.asarray(mean_delta[name], np.float32)).astype(np.float32)
                for name in weights}
    new = {name: (np.asarray(w, np.float32) + lr * velocity[name]).astype(np.float32) for name, w in weights.items()}
    return new, FedAvgMState(velocity, state.step + 1)


def state_to_arrays(state: FedAvgMState) -> dict[str, np.ndarray]:
    arrays = {_PREFIX + name: v for name, v in state.velocity.items()}
    arrays["step"] = np.array(state.step, dtype=np.int64)
    return arrays


def state_from_arrays(arrays: dict[str, np.ndarray]) -> FedAvgMState:
    if "step" not in arrays:
        raise ValueError("FedAvgM state arrays lack 'step'")
    velocity = {key.removeprefix(_PREFIX): np.array(value, np.float32)
                for key, value in arrays.items() if key.startswith(_PREFIX)}
    return FedAvgMState(velocity, int(arrays["step"]))


register_optimizer(OptimizerSpec(
    "fedavgm", FedAvgMConfig, init_server, server_step, state_to_arrays, state_from_arrays,
    citation="Hsu, Qi, Brown, \"Measuring the Effects of Non-Identical Data Distribution for Federated Visual "
             "Classification\", arXiv:1909.06335, 2019"))
