"""What every tensor encoding implements, the registry that names them, and the checks they share."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedlite.protocol.errors import ProtocolError

Tensors = dict[str, np.ndarray]
Shape = tuple[int, ...]


class CodecError(ProtocolError):
    """A payload that is not a well-formed fedlite frame."""


class TensorSource(Protocol):
    """The tensors of one frame as a codec reads them: named weights, and exact-size reads of their parts.

    `weights` is the layout to decode (the model's when the caller knows it, else what the frame declares);
    `take` returns a read-only 1-D view of exactly `count` values of `dtype` stored for `weight` under
    `suffix`, or raises CodecError: nothing the payload claims is allocated before its size is checked.
    """

    weights: list[tuple[str, Shape]]
    allow_nonfinite: bool

    def take(self, weight: str, suffix: str, dtype: np.dtype[Any], count: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Codes:
    """One weight decoded to integer codes and float32 scales: value = code x scale, with one scale per channel
    (the last axis) when `scale` holds ``shape[-1]`` of them for rank >= 2, else one scale for the tensor.

    `codes` is flat (C order) and may be a read-only view into the frame: the aggregator checks and folds an
    update from its codes without ever holding its float32 values.
    """

    codes: np.ndarray  # int8 [size(shape)]
    scale: np.ndarray  # float32 [channels] or [1]
    shape: Shape

    @property
    def per_channel(self) -> bool:
        return len(self.shape) >= 2 and self.scale.size == self.shape[-1] and self.scale.size > 1

    def values(self) -> np.ndarray:
        """The float32 values, of `shape` (a new array)."""
        return dequantize(self.codes, self.scale, self.shape, self.per_channel)


class Codec:
    """One encoding of a frame's tensors, registered by `name` (the header's ``encoding``).

    `suffixes` are the wire tensors per weight, in order ("" is the weight's own name): they are the entries a
    frame declares for it. `self_describing`: the weight's own tensor has the weight's shape, so a frame decodes
    without knowing the model. `compact`: updates use the compact body (no tensor table) by default.
    `residual`: the encoder keeps client-side error feedback between rounds. `coded`: the codec decodes to
    `Codes` (`decode_codes`), and `decode` is their values.
    """

    name: str = ""
    kinds: tuple[str, ...] = ("update",)
    suffixes: tuple[str, ...] = ("",)
    self_describing: bool = True
    compact: bool = False
    residual: bool = False
    coded: bool = False
    order: int = 100  # where `names` lists it

    def encode(self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator | None = None,
               residual: Mapping[str, np.ndarray] | None = None) -> tuple[Tensors, Tensors | None]:
        """Wire tensors for `delta` (rng: stochastic rounding where the codec has it) and the new residual."""
        raise NotImplementedError

    def decode(self, tensors: TensorSource, header: Any) -> Tensors:
        """float32 values per weight; refuses out-of-range codes, bad scales and wrong sizes with CodecError."""
        if not self.coded:
            raise NotImplementedError
        return {name: codes.values() for name, codes in self.decode_codes(tensors, header).items()}

    def decode_codes(self, tensors: TensorSource, header: Any) -> dict[str, Codes]:
        """`Codes` per weight, with every check `decode` makes (only where `coded`)."""
        raise NotImplementedError

    def max_bytes(self, shape: Shape) -> int:
        """The most bytes one weight of `shape` can take on the wire (sizes the aggregator's limits)."""
        raise NotImplementedError


_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if not codec.name or codec.name in _REGISTRY:
        raise ValueError(f"codec name {codec.name!r} is empty or already registered")
    _REGISTRY[codec.name] = codec
    return codec


def get(name: str) -> Codec:
    """The codec named `name`; CodecError("header") for a name no codec has."""
    codec = _REGISTRY.get(name)
    if codec is None:
        raise CodecError("header", f"unknown encoding {name!r}")
    return codec


def names(kind: str | None = None) -> list[str]:
    """Registered encodings (for frames of `kind`, e.g. "update"), the legacy int8 first."""
    found = [c for c in _REGISTRY.values() if kind is None or kind in c.kinds]
    return [c.name for c in sorted(found, key=lambda c: c.order)]


def check_encoding(name: str, kind: str = "update") -> str:
    """`name` if it is a registered encoding for `kind`; ValueError listing the known ones otherwise."""
    known = names(kind)
    if name not in known:
        raise ValueError(f"encoding must be one of {', '.join(known)}, not {name!r}")
    return name


# --- shared helpers -------------------------------------------------------------------------------------


def channels(shape: Shape) -> int:
    """Scales per weight when quantized per channel: the last axis for rank >= 2, else one."""
    return shape[-1] if len(shape) >= 2 else 1


def size(shape: Shape) -> int:
    return math.prod(shape)


def with_residual(value: np.ndarray, residual: Mapping[str, np.ndarray] | None, name: str) -> np.ndarray:
    """`value` plus the residual kept for `name` (float32; the residual is ignored unless its shape matches)."""
    value = np.asarray(value, dtype=np.float32)
    extra = None if residual is None else residual.get(name)
    if extra is not None and extra.shape == value.shape:
        return value + extra
    return value


def max_scale(levels: int) -> np.float32:
    """The largest scale whose (levels + 1) x is still a finite float32."""
    return np.float32(np.finfo(np.float32).max / (levels + 1))


def check_scales(weight: str, scale: np.ndarray, levels: int) -> None:
    """Scales must be finite, >= 0, and small enough that every code times its scale is finite."""
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise CodecError("nonfinite", f"tensor {weight!r} has a negative or non-finite scale")
    if np.any(scale > max_scale(levels)):
        raise CodecError("nonfinite", f"tensor {weight!r} has a scale beyond float32 range")


def quantize_symmetric(x: np.ndarray, levels: int, per_channel: bool,
                       rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Codes in [-levels, levels] and float32 scales (per channel, the last axis, for rank >= 2 when `per_channel`).

    scale = max|x| / levels, so |x / scale| <= levels and the clip never binds: with `rng`, stochastic rounding
    (floor(x / scale + u), u ~ U[0, 1)) is unbiased.
    """
    x = np.asarray(x, dtype=np.float32)
    by_channel = per_channel and x.ndim >= 2
    if by_channel:
        max_abs = np.max(np.abs(x.reshape(-1, x.shape[-1])), axis=0) if x.size else np.zeros(x.shape[-1])
    else:
        max_abs = np.array([np.max(np.abs(x)) if x.size else 0.0], dtype=np.float32)
    scale = (max_abs / levels).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    scaled = x / safe if by_channel else x / safe[0]
    q = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32)) if rng is not None else np.rint(scaled)
    with np.errstate(invalid="ignore"):  # NaN input casts to garbage here; decode refuses its NaN scale
        return np.clip(q, -levels, levels).astype(np.int8), scale


def dequantize(codes: np.ndarray, scale: np.ndarray, shape: Shape, per_channel: bool) -> np.ndarray:
    """codes (any integer dtype, the weight's element count) x scale, as float32 of `shape`."""
    out = codes.astype(np.float32).reshape(shape)
    out *= scale if per_channel and len(shape) >= 2 else scale[0]  # in place: no temporary
    return out


def ordered(weights: Sequence[tuple[str, Shape]]) -> list[tuple[str, Shape]]:
    return [(name, tuple(int(d) for d in shape)) for name, shape in weights]
