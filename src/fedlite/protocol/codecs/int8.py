"""``int8``: symmetric int8 codes with float32 scales per channel (the last axis) for rank >= 2, one otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlite.protocol.codecs.base import (
    Codec,
    CodecError,
    Codes,
    Shape,
    Tensors,
    TensorSource,
    channels,
    check_scales,
    quantize_symmetric,
    register,
    size,
    with_residual,
)

SCALE_SUFFIX = ":scale"
LEVELS = 127


class Int8(Codec):
    """Each weight ``W``: int8 ``W`` (its shape, codes -127..127) and float32 ``W:scale`` (one per channel)."""

    name = "int8"
    order = 0
    kinds = ("update", "weights")
    suffixes = ("", SCALE_SUFFIX)
    per_channel = True
    coded = True

    def scales(self, shape: Shape) -> int:
        return channels(shape) if self.per_channel else 1

    def encode(self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator | None = None,
               residual: Mapping[str, np.ndarray] | None = None) -> tuple[Tensors, Tensors | None]:
        tensors: Tensors = {}
        for name, value in delta.items():
            q, scale = quantize_symmetric(with_residual(value, residual, name), LEVELS, self.per_channel, rng)
            tensors[name] = q
            tensors[name + SCALE_SUFFIX] = scale
        return tensors, None

    def decode_codes(self, tensors: TensorSource, header: Any) -> dict[str, Codes]:
        out: dict[str, Codes] = {}
        for name, shape in tensors.weights:
            q = tensors.take(name, "", np.dtype(np.int8), size(shape))
            scale = tensors.take(name, SCALE_SUFFIX, np.dtype(np.float32), self.scales(shape))
            check_scales(name, scale, LEVELS)
            if q.size and q.min() < -LEVELS:
                raise CodecError("code", f"tensor {name!r} holds the code -128 (codes are -127..127)")
            out[name] = Codes(q, scale, shape)
        return out

    def max_bytes(self, shape: Shape) -> int:
        return size(shape) + 4 * self.scales(shape)


register(Int8())
