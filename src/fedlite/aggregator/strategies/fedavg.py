"""Federated Averaging as a streaming, mergeable weighted mean, plus its plain server step.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017. The round's mean delta is sum_i n_i * delta_i / sum_i n_i; the server
then applies w <- w + server_lr * mean_delta (server_lr = 1 is the paper's FedAvg).

Like FedJAX's ``fed_avg``, nothing keeps a list of client results: `accumulate` folds each delta into a
`RunningSum` of float64 accumulators (memory O(model), the delta is not retained), and `merge` combines the
partial sums of several aggregators.

Order of additions (what "exact" means for `merge`): per coordinate, `accumulate` computes
``sum <- sum + float64(delta) * float64(weight)`` (one rounding for the product, one for the sum) and `merge`
computes ``a.sum + b.sum``. Accumulating A then B therefore equals ``merge(partial_A, partial_B)`` up to
float64 re-association, i.e. to ~1e-16 relative per addition, far below float32 resolution of the mean; it is
bitwise equal whenever the sums are exactly representable (e.g. int8 updates with power-of-two scales and
integer weights). `merge` itself is commutative bitwise and `init` is its identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlite.aggregator.deltas import Delta, as_delta
from fedlite.aggregator.strategies.registry import OptimizerSpec, ReducerSpec, register_optimizer, register_reducer
from fedlite.settings import require

Specs = list[tuple[str, tuple[int, ...]]]

# Chunk size (elements) for the float64 product in `accumulate`: bounds its temporary to 512 KiB.
_CHUNK = 1 << 16


@dataclass
class RunningSum:
    """Weighted sums of deltas: ``sums[name] = sum_i weight_i * delta_i[name]``, float64 unless asked otherwise."""

    sums: dict[str, np.ndarray]
    total_weight: float = 0.0
    count: int = 0


def init(specs: Specs, dtype: str = "float64") -> RunningSum:
    """An empty running sum for weights named and shaped as in `specs` (see `protocol.layout.weight_specs`).

    float64 accumulators (the default) cost 2x the float32 model; "float32" halves that for memory-starved
    aggregators at the price of ~1e-7 relative rounding per addition and no exactness claim for `merge`.
    """
    if dtype not in ("float64", "float32"):
        raise ValueError(f"accumulator dtype must be float64 or float32, not {dtype!r}")
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"weight names must be unique, got {names}")
    return RunningSum({name: np.zeros(tuple(shape), dtype=dtype) for name, shape in specs})


def _chunks(size: int) -> Iterator[slice]:
    for start in range(0, size, _CHUNK):
        yield slice(start, min(start + _CHUNK, size))


def _check_same_layout(sums: dict[str, np.ndarray], other: Mapping[str, Any], what: str) -> None:
    """`other` (arrays, or shapes) has exactly the running sum's names and shapes."""
    if set(other) != set(sums):
        missing, extra = sorted(set(sums) - set(other)), sorted(set(other) - set(sums))
        raise ValueError(f"{what} names differ from the running sum: missing {missing[:3]}, extra {extra[:3]}")
    for name, acc in sums.items():
        shape = other[name] if isinstance(other[name], tuple) else tuple(np.shape(other[name]))
        if shape != acc.shape:
            raise ValueError(f"{what} {name!r} has shape {shape}, expected {acc.shape}")


def accumulate(state: RunningSum, delta: Delta | dict[str, np.ndarray], weight: float) -> RunningSum:
    """Add ``weight * delta`` to `state` in place and return it; `delta` (arrays, or a quantized update's codes
    folded without expanding them) is read, never kept."""
    weight = float(weight)
    if not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight must be a finite number > 0, got {weight}")
    delta = as_delta(delta)
    _check_same_layout(state.sums, delta.shapes(), "delta")
    delta.add_into(state.sums, weight)
    state.total_weight += weight
    state.count += 1
    return state


def merge(a: RunningSum, b: RunningSum) -> RunningSum:
    """The running sum of both partials' updates, as a new state (inputs untouched)."""
    _check_same_layout(a.sums, b.sums, "partial sum")
    sums = {name: a.sums[name] + b.sums[name] for name in a.sums}
    return RunningSum(sums, a.total_weight + b.total_weight, a.count + b.count)


def mean(state: RunningSum) -> dict[str, np.ndarray]:
    """The weighted mean delta as float32."""
    if state.count == 0:
        raise ValueError("cannot take the mean of zero updates: no client update was accumulated this round")
    total = np.float64(state.total_weight)
    out = {}
    for name, acc in state.sums.items():
        result = np.empty(acc.shape, dtype=np.float32)
        src, dst = acc.reshape(-1), result.reshape(-1)
        for part in _chunks(src.size):  # chunked so no model-sized float64 temporary appears
            np.divide(src[part], total, out=dst[part], casting="same_kind")
        out[name] = result
    return out


def to_arrays(state: RunningSum) -> dict[str, np.ndarray]:
    """A flat dict of arrays (safetensors-ready) from which `from_arrays` rebuilds `state` exactly."""
    arrays = {f"sum/{name}": acc for name, acc in state.sums.items()}
    arrays["total_weight"] = np.array(state.total_weight, dtype=np.float64)
    arrays["count"] = np.array(state.count, dtype=np.int64)
    return arrays


def from_arrays(arrays: dict[str, np.ndarray]) -> RunningSum:
    missing = {"total_weight", "count"} - set(arrays)
    if missing:
        raise ValueError(f"running-sum arrays lack {sorted(missing)}")
    sums = {key.removeprefix("sum/"): np.array(value, dtype=np.float32 if value.dtype == np.float32 else np.float64,
                                                order="C")
            for key, value in arrays.items() if key.startswith("sum/")}
    return RunningSum(sums, float(arrays["total_weight"]), int(arrays["count"]))


@dataclass(frozen=True)
class MeanConfig:
    """[server.mean]: float32 running sums halve the accumulators; their rounding stays far below int8 quantization."""

    sum_dtype: str = "float32"  # float32 | float64

    def validate(self) -> None:
        require(self.sum_dtype in ("float32", "float64"), "sum_dtype must be float32 or float64")


class MeanAggregator:
    """The `Aggregator` interface over the pure functions above: streaming, O(model) memory."""

    def __init__(self, specs: Specs, dtype: str = "float64") -> None:
        self.specs, self.dtype = specs, dtype
        self.state = init(specs, dtype)

    def add(self, delta: Delta | dict[str, np.ndarray], weight: float) -> None:
        accumulate(self.state, delta, weight)

    def fresh(self) -> MeanAggregator:
        return MeanAggregator(self.specs, self.dtype)

    def absorb(self, other: MeanAggregator) -> None:
        """`merge`, in place: the same sums (``a + b`` per coordinate) without a third model-sized buffer."""
        _check_same_layout(self.state.sums, other.state.sums, "partial sum")
        for name, acc in self.state.sums.items():
            np.add(acc, other.state.sums[name], out=acc)
        self.state.total_weight += other.state.total_weight
        self.state.count += other.state.count

    @property
    def count(self) -> int:
        return self.state.count

    def result(self) -> dict[str, np.ndarray]:
        return mean(self.state)


# --- server step --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FedAvgConfig:
    server_lr: float = 1.0


@dataclass
class FedAvgState:
    """Plain FedAvg has no optimizer state beyond the number of steps taken."""

    step: int = 0


def init_server(weights: dict[str, np.ndarray], config: FedAvgConfig = FedAvgConfig()) -> FedAvgState:
    return FedAvgState()


def check_delta(weights: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> None:
    """Raise ValueError unless `delta` has exactly the names and shapes of `weights`."""
    if set(delta) != set(weights):
        missing, extra = sorted(set(weights) - set(delta)), sorted(set(delta) - set(weights))
        raise ValueError(f"delta names differ from the weights: missing {missing[:3]}, extra {extra[:3]}")
    for name, value in weights.items():
        if np.shape(delta[name]) != np.shape(value):
            raise ValueError(f"delta {name!r} has shape {np.shape(delta[name])}, the weight has {np.shape(value)}")


def server_step(
    weights: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray], state: FedAvgState,
    config: FedAvgConfig = FedAvgConfig(),
) -> tuple[dict[str, np.ndarray], FedAvgState]:
    """w <- w + server_lr * mean_delta (new arrays; the inputs are not modified)."""
    check_delta(weights, mean_delta)
    lr = np.float32(config.server_lr)
    new = {name: (np.asarray(w, np.float32) + lr * np.asarray(mean_delta[name], np.float32)).astype(np.float32)
           for name, w in weights.items()}
    return new, FedAvgState(step=state.step + 1)


def state_to_arrays(state: FedAvgState) -> dict[str, np.ndarray]:
    return {"step": np.array(state.step, dtype=np.int64)}


def state_from_arrays(arrays: dict[str, np.ndarray]) -> FedAvgState:
    if "step" not in arrays:
        raise ValueError("FedAvg state arrays lack 'step'")
    return FedAvgState(step=int(arrays["step"]))


_CITATION = ("McMahan, Moore, Ramage, Hampson, Agüera y Arcas, \"Communication-Efficient Learning of Deep Networks "
             "from Decentralized Data\", AISTATS 2017")


def _make_mean(specs: Specs, config: MeanConfig) -> MeanAggregator:
    return MeanAggregator(specs, config.sum_dtype)


register_optimizer(OptimizerSpec("fedavg", FedAvgConfig, init_server, server_step, state_to_arrays,
                                 state_from_arrays, _CITATION))
register_reducer(ReducerSpec("mean", MeanConfig, _make_mean, streaming=True, citation=_CITATION))
