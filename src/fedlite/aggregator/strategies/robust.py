"""Robust aggregation: global-norm clipping, coordinate-wise trimmed mean and coordinate-wise median.

Trimmed mean and median follow Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML 2018: per coordinate, sort the N client values, drop the
floor(beta * N) smallest and largest and average the rest (trimmed mean), or take the middle value (median).
Both are unweighted, as in the paper: the example counts a client reports are exactly what an attacker
would inflate, so `add` accepts a weight for interface uniformity and ignores it.

Memory: unlike the streaming mean these must hold every update, O(N * P) float32 (N updates, P parameters),
plus one tensor's N copies at `result` time. Use them for small models or small cohorts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from fedlite.aggregator.deltas import Delta, as_delta, l2_norm
from fedlite.aggregator.strategies.registry import ReducerSpec, register_reducer
from fedlite.settings import Range

Specs = list[tuple[str, tuple[int, ...]]]

def global_norm(delta: dict[str, np.ndarray]) -> float:
    """The L2 norm of all tensors together, accumulated in float64 (temporaries bounded to one chunk)."""
    return l2_norm(delta.values())


def clip_by_global_norm(
    delta: dict[str, np.ndarray], max_norm: float, *, inplace: bool = False
) -> tuple[dict[str, np.ndarray], float]:
    """Scale `delta` so its global L2 norm is at most `max_norm`; returns (clipped, norm before clipping).

    Below the bound the tensors come back unchanged (same arrays). With ``inplace=True`` float32 arrays
    are scaled in place, so clipping a freshly decoded update needs no second copy.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = global_norm(delta)
    if norm <= max_norm:
        return dict(delta), norm
    factor = np.float32(max_norm / norm)
    if not inplace:
        return {name: (np.asarray(value, np.float32) * factor) for name, value in delta.items()}, norm
    out = {}
    for name, value in delta.items():
        if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.flags.writeable:
            value *= factor
            out[name] = value
        else:
            out[name] = np.asarray(value, np.float32) * factor
    return out, norm


class _HoldingAggregator:
    """Keeps a float32 copy of every update; subclasses reduce the stacked values per tensor."""

    def __init__(self, specs: Specs) -> None:
        self._specs = [(name, tuple(shape)) for name, shape in specs]
        self._updates: list[dict[str, np.ndarray]] = []

    def add(self, delta: Delta | dict[str, np.ndarray], weight: float = 1.0) -> None:
        del weight  # unweighted by design, see the module docstring
        delta = as_delta(delta).dense()
        expected = dict(self._specs)
        if set(delta) != set(expected):
            missing, extra = sorted(set(expected) - set(delta)), sorted(set(delta) - set(expected))
            raise ValueError(f"delta names differ from the model: missing {missing[:3]}, extra {extra[:3]}")
        for name, shape in self._specs:
            if tuple(np.shape(delta[name])) != shape:
                raise ValueError(f"delta {name!r} has shape {tuple(np.shape(delta[name]))}, expected {shape}")
        self._updates.append({name: np.array(delta[name], dtype=np.float32) for name, _ in self._specs})

    def fresh(self) -> _HoldingAggregator:
        empty = copy.copy(self)
        empty._updates = []
        return empty

    def absorb(self, other: _HoldingAggregator) -> None:
        self._updates.extend(other._updates)

    @property
    def count(self) -> int:
        return len(self._updates)

    def result(self) -> dict[str, np.ndarray]:
        if not self._updates:
            raise ValueError("cannot aggregate zero updates: no client update was added this round")
        return {name: self._reduce(np.stack([u[name] for u in self._updates])) for name, _ in self._specs}

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TrimmedMeanAggregator(_HoldingAggregator):
    """Coordinate-wise trimmed mean: drop floor(trim_fraction * N) values from each side, average the rest."""

    def __init__(self, specs: Specs, trim_fraction: float = 0.1) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        super().__init__(specs)
        self.trim_fraction = trim_fraction

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        return trimmed_mean(stacked, self.trim_fraction)


class MedianAggregator(_HoldingAggregator):
    """Coordinate-wise median (the mean of the two middle values when N is even)."""

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0, overwrite_input=True).astype(np.float32)


def trimmed_mean(stacked: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Trimmed mean over axis 0 of `stacked` (N updates); sorts `stacked` in place."""
    n = stacked.shape[0]
    k = int(np.floor(trim_fraction * n))
    stacked.sort(axis=0)
    return np.mean(stacked[k : n - k], axis=0, dtype=np.float64).astype(np.float32)


@dataclass(frozen=True)
class TrimmedMeanConfig:
    trim_fraction: Annotated[float, Range(ge=0, lt=0.5)] = 0.1  # beta: the share dropped from each side


@dataclass(frozen=True)
class MedianConfig:
    """The median takes no parameters."""


def _make_trimmed_mean(specs: Specs, config: TrimmedMeanConfig) -> TrimmedMeanAggregator:
    return TrimmedMeanAggregator(specs, config.trim_fraction)


def _make_median(specs: Specs, config: MedianConfig) -> MedianAggregator:
    return MedianAggregator(specs)


_CITATION = ("Yin, Chen, Ramchandran, Bartlett, \"Byzantine-Robust Distributed Learning: Towards Optimal "
             "Statistical Rates\", ICML 2018")
register_reducer(ReducerSpec("trimmed_mean", TrimmedMeanConfig, _make_trimmed_mean, streaming=False,
                             citation=_CITATION))
register_reducer(ReducerSpec("median", MedianConfig, _make_median, streaming=False, citation=_CITATION))
