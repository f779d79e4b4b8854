"""``int4``: symmetric 4-bit codes (-7..7) per channel, two codes per byte, with float32 scales."""

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

CODES_SUFFIX = ":int4"
SCALE_SUFFIX = ":scale"
LEVELS = 7


def pack(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-8, 7] -> uint8, two per byte: element 2i in the low nibble, 2i+1 in the high one
    (4-bit two's complement); an odd count leaves the last high nibble 0."""
    nibbles = (codes.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _nibble_table() -> np.ndarray:
    """[256, 2] int8: the (low, high) signed nibbles of every byte."""
    byte = np.arange(256)
    table = np.stack([byte & 0x0F, byte >> 4], axis=1).astype(np.int8)
    table[table > 7] -= 16  # two's complement nibbles: 8..15 are -8..-1
    return table


_NIBBLES = _nibble_table()


def unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of `pack`: `count` int8 codes (one table lookup per byte). Refuses the code -8 and a non-zero
    padding nibble."""
    if count % 2 and packed.size and packed[-1] >> 4 != 0:
        raise CodecError("code", "the padding nibble of an odd-sized int4 tensor is not 0")
    codes = _NIBBLES[packed].reshape(-1)[:count]
    if codes.size and codes.min() < -LEVELS:
        raise CodecError("code", "an int4 tensor holds the code -8 (codes are -7..7)")
    return codes


class Int4(Codec):
    """Each weight ``W``: uint8 ``W:int4`` [ceil(n / 2)] (packed codes, C order) and float32 ``W:scale``
    (one per channel, the last axis, for rank >= 2; else one)."""

    name = "int4"
    order = 2
    suffixes = (CODES_SUFFIX, SCALE_SUFFIX)
    self_describing = False
    compact = True
    coded = True

    def encode(self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator | None = None,
               residual: Mapping[str, np.ndarray] | None = None) -> tuple[Tensors, Tensors | None]:
        tensors: Tensors = {}
        for name, value in delta.items():
            q, scale = quantize_symmetric(with_residual(value, residual, name), LEVELS, True, rng)
            tensors[name + CODES_SUFFIX] = pack(q)
            tensors[name + SCALE_SUFFIX] = scale
        return tensors, None

    def decode_codes(self, tensors: TensorSource, header: Any) -> dict[str, Codes]:
        out: dict[str, Codes] = {}
        for name, shape in tensors.weights:
            n = size(shape)
            packed = tensors.take(name, CODES_SUFFIX, np.dtype(np.uint8), (n + 1) // 2)
            scale = tensors.take(name, SCALE_SUFFIX, np.dtype(np.float32), channels(shape))
            check_scales(name, scale, LEVELS)
            try:
                codes = unpack(packed, n)
            except CodecError as exc:
                raise CodecError(exc.reason, f"tensor {name!r}: {exc.detail}") from None
            out[name] = Codes(codes, scale, shape)
        return out

    def max_bytes(self, shape: Shape) -> int:
        return (size(shape) + 1) // 2 + 4 * channels(shape)


register(Int4())
