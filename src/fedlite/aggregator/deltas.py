"""An update's delta as the aggregator checks and folds it: integer codes with their scales, or dense float32.

A quantized update is never expanded to a model-sized float32 array. Its checks (largest magnitude, L2 norm)
and its fold into the running sums (``sums += weight * factor * code * scale``) run over the codes in chunks
that stay in cache, and clipping it only changes `factor`. One update costs its decompression, one pass over
its codes for the checks and one pass over the accumulator; dense deltas (float codecs, tests) take the same
interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlite.protocol.codecs.base import Codes

Arrays = dict[str, np.ndarray]
Shape = tuple[int, ...]

# Elements per pass: a float32 chunk (1 MiB) stays in L2, and each numpy call is long enough that two workers
# run in parallel (numpy releases the GIL inside a call; with 32k-element chunks the calls between them
# serialized two threads, see benchmarks/aggregation.py).
CHUNK = 1 << 18


class Delta:
    """One update's delta: per-weight values times a scalar `factor` (1 until clipped)."""

    factor: float

    def shapes(self) -> dict[str, Shape]:
        raise NotImplementedError

    def _measure(self, what: str) -> float:
        """``max_abs`` or ``norm`` before `factor`, computed on first use and shared by scaled copies."""
        raise NotImplementedError

    def scaled(self, factor: float) -> Delta:
        """This delta times `factor` (clipping): nothing is copied."""
        raise NotImplementedError

    def add_into(self, sums: Mapping[str, np.ndarray], weight: float) -> None:
        """``sums[name] += weight * value`` for every weight, in the sums' precision."""
        raise NotImplementedError

    def take(self, name: str, positions: np.ndarray) -> np.ndarray:
        """The float32 values at flat `positions` of weight `name`."""
        raise NotImplementedError

    def dense(self) -> Arrays:
        """float32 values per weight (new arrays once scaled or quantized)."""
        raise NotImplementedError

    def max_abs(self) -> float:
        return self._measure("max_abs") * self.factor

    def max_abs_bound(self) -> float:
        """An upper bound of `max_abs`, cheap to compute (the exact value is needed only when it is over a limit)."""
        return self.max_abs()

    def norm(self) -> float:
        return self._measure("norm") * self.factor


@dataclass(frozen=True)
class CodedDelta(Delta):
    """Codes and scales per weight, as the codec decoded them (views into the frame)."""

    parts: dict[str, Codes]
    factor: float = 1.0
    _measured: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def shapes(self) -> dict[str, Shape]:
        return {name: codes.shape for name, codes in self.parts.items()}

    def max_abs_bound(self) -> float:
        """128 x the largest scale: no int8 code is larger, so no value is."""
        largest = max((float(np.max(c.scale)) for c in self.parts.values() if c.scale.size), default=0.0)
        return 128.0 * largest * self.factor

    def _measure(self, what: str) -> float:
        if what not in self._measured:
            if what == "norm":
                self._measured[what] = float(np.sqrt(sum(_code_squares(c) for c in self.parts.values())))
            else:
                self._measured[what] = max((_code_peak(c) for c in self.parts.values()), default=0.0)
        return self._measured[what]

    def scaled(self, factor: float) -> CodedDelta:
        return CodedDelta(self.parts, self.factor * float(factor), self._measured)

    def add_into(self, sums: Mapping[str, np.ndarray], weight: float) -> None:
        # The same roundings as expanding the codes and adding the dense delta: value = float32(code x scale),
        # then value x (factor x weight) in the accumulator's precision.
        w = np.float64(self.factor) * np.float64(weight)
        for name, codes in self.parts.items():
            acc = sums[name]
            scale = codes.scale if codes.per_channel else codes.scale[0]
            values = np.empty(CHUNK, np.float32)
            widened = np.empty(CHUNK, acc.dtype) if acc.dtype != np.float32 else values
            for part, out in _row_chunks(codes, acc.reshape(-1)):
                tmp = values[: part.size].reshape(part.shape)
                np.copyto(tmp, part, casting="unsafe")  # int8 -> float32, in cache
                tmp *= scale
                product = widened[: part.size].reshape(part.shape)
                np.multiply(tmp, w, out=product, dtype=acc.dtype, casting="same_kind")
                out += product

    def take(self, name: str, positions: np.ndarray) -> np.ndarray:
        codes = self.parts[name]
        scale = codes.scale[positions % codes.scale.size] if codes.per_channel else codes.scale[0]
        return (codes.codes[positions] * scale * np.float32(self.factor)).astype(np.float32)

    def dense(self) -> Arrays:
        out = {}
        for name, codes in self.parts.items():
            values = codes.values()
            if self.factor != 1.0:
                values *= np.float32(self.factor)
            out[name] = values
        return out


@dataclass(frozen=True)
class DenseDelta(Delta):
    """float32 values per weight."""

    arrays: Arrays
    factor: float = 1.0
    _measured: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def shapes(self) -> dict[str, Shape]:
        return {name: tuple(np.shape(value)) for name, value in self.arrays.items()}

    def _measure(self, what: str) -> float:
        if what not in self._measured:
            if what == "norm":
                self._measured[what] = l2_norm(self.arrays.values())
            else:  # max and min: no |x| temporary
                self._measured[what] = max((max(float(np.max(v)), -float(np.min(v))) for v in self.arrays.values()
                                            if np.size(v)), default=0.0)
        return self._measured[what]

    def scaled(self, factor: float) -> DenseDelta:
        return DenseDelta(self.arrays, self.factor * float(factor), self._measured)

    def add_into(self, sums: Mapping[str, np.ndarray], weight: float) -> None:
        w = np.float64(self.factor) * np.float64(weight)
        for name, acc in sums.items():
            src, dst = np.asarray(self.arrays[name]).reshape(-1), acc.reshape(-1)
            for start in range(0, src.size, CHUNK):
                part = slice(start, start + CHUNK)
                dst[part] += np.multiply(src[part], w, dtype=dst.dtype)  # in the accumulator's precision

    def take(self, name: str, positions: np.ndarray) -> np.ndarray:
        return (np.asarray(self.arrays[name], np.float32).reshape(-1)[positions] * np.float32(self.factor))

    def dense(self) -> Arrays:
        if self.factor == 1.0:
            return dict(self.arrays)
        return {name: np.asarray(value, np.float32) * np.float32(self.factor) for name, value in self.arrays.items()}


def as_delta(values: Delta | Mapping[str, Any]) -> Delta:
    """`values` as a Delta: itself, codes per weight (a `CodedDelta`) or arrays per weight (a `DenseDelta`)."""
    if isinstance(values, Delta):
        return values
    if values and all(isinstance(v, Codes) for v in values.values()):
        return CodedDelta(dict(values))
    return DenseDelta({name: np.asarray(value, np.float32) for name, value in values.items()})


def l2_norm(values: Any) -> float:
    """The L2 norm of float arrays together, in float64 over float32 chunks (temporaries bounded to a chunk)."""
    total = 0.0
    for value in values:
        flat = np.asarray(value, dtype=np.float32).reshape(-1)
        for start in range(0, flat.size, CHUNK):
            part = flat[start : start + CHUNK]
            # einsum, not BLAS: np.dot spins up BLAS threads that cost more than the sum on a busy device
            total += float(np.einsum("i,i->", part, part))
    return float(np.sqrt(total))


def _row_chunks(codes: Codes, flat: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """(codes of some rows, the matching rows of `flat`) over a weight: 2-D (rows, channels) when
    quantized per channel, else 1-D slices, about CHUNK values each."""
    if codes.per_channel:
        width = codes.scale.size
        grid = codes.codes.reshape(-1, width)
        target = None if flat is None else flat.reshape(-1, width)
        step = max(1, CHUNK // width)
    else:
        grid, target, step = codes.codes, flat, CHUNK
    for start in range(0, grid.shape[0], step):
        rows = slice(start, start + step)
        yield grid[rows], None if target is None else target[rows]


def _code_peak(codes: Codes) -> float:
    """max |value| of one weight, from the extremes of its codes (per channel when scaled per channel)."""
    if codes.codes.size == 0:
        return 0.0
    scale = codes.scale.astype(np.float64)
    grid = codes.codes.reshape(-1, scale.size) if codes.per_channel else codes.codes
    axis = 0 if codes.per_channel else None
    peak = np.maximum(grid.max(axis=axis).astype(np.float64), -grid.min(axis=axis).astype(np.float64))
    return float(np.max(peak * (scale if codes.per_channel else scale[0])))


def _code_squares(codes: Codes) -> float:
    """The sum of squared values of one weight, from its codes: squares over float32 chunks that stay in cache
    (summed in float32 within a chunk, float64 across chunks), times the squared scales."""
    if codes.codes.size == 0:
        return 0.0
    scale = codes.scale.astype(np.float64)
    axis = 0 if codes.per_channel else None
    squares = np.zeros(scale.size if codes.per_channel else 1, np.float64)
    buffer = np.empty(CHUNK, np.float32)
    for part, _ in _row_chunks(codes):
        tmp = buffer[: part.size].reshape(part.shape)
        np.copyto(tmp, part, casting="unsafe")
        np.square(tmp, out=tmp)
        squares += tmp.sum(axis=axis)
    return float(squares @ (scale * scale)) if codes.per_channel else float(squares[0] * scale[0] ** 2)
