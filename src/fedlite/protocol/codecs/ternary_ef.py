"""``ternary-ef``: ternary codes {-1, 0, +1} x one float32 scale per tensor, with client-side error feedback."""

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
    check_scales,
    register,
    size,
    with_residual,
)

SCALE_SUFFIX = ":scale"
MASK_SUFFIX = ":mask"
SIGN_SUFFIX = ":sign"
# A device that skips rounds keeps its residual; one older than this many rounds is dropped (see README).
MAX_RESIDUAL_AGE = 20


def ternarize(v: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(codes in {-1, 0, 1}, scale): scale = max |v|, code = round(v / scale), i.e. +-1 where |v| > scale / 2.

    Deterministic: the error feedback carries what rounding leaves out into the next round, which measured
    better than unbiased stochastic ternarization (see benchmarks/RESULTS.md).
    """
    scale = np.float32(np.max(np.abs(v))) if v.size else np.float32(0)
    if not scale > 0:  # zero, or NaN (whose scale decode refuses)
        return np.zeros(v.shape, np.int8), scale
    with np.errstate(invalid="ignore"):
        return np.rint(v / scale).astype(np.int8), scale


class TernaryEF(Codec):
    """Each weight ``W`` (n values): float32 ``W:scale`` [1]; uint8 ``W:mask`` [ceil(n / 8)], bit i set where
    code i is not 0 (MSB first, numpy.packbits order); uint8 ``W:sign`` [ceil(k / 8)] for the k set bits of the
    mask, bit j set where the j-th non-zero code is -1. Padding bits are 0. value = code x scale."""

    name = "ternary-ef"
    order = 3
    suffixes = (SCALE_SUFFIX, MASK_SUFFIX, SIGN_SUFFIX)
    self_describing = False
    compact = True
    residual = True
    coded = True

    def encode(self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator | None = None,
               residual: Mapping[str, np.ndarray] | None = None) -> tuple[Tensors, Tensors | None]:
        tensors: Tensors = {}
        left: Tensors = {}
        for name, value in delta.items():
            v = with_residual(value, residual, name)
            codes, scale = ternarize(v)
            flat = codes.reshape(-1)
            tensors[name + SCALE_SUFFIX] = np.array([scale], np.float32)
            tensors[name + MASK_SUFFIX] = np.packbits(flat != 0)
            tensors[name + SIGN_SUFFIX] = np.packbits(flat[flat != 0] < 0)
            left[name] = v - codes.astype(np.float32) * scale
        return tensors, left

    def decode_codes(self, tensors: TensorSource, header: Any) -> dict[str, Codes]:
        out: dict[str, Codes] = {}
        for name, shape in tensors.weights:
            n = size(shape)
            scale = tensors.take(name, SCALE_SUFFIX, np.dtype(np.float32), 1)
            check_scales(name, scale, 1)
            bits = np.unpackbits(tensors.take(name, MASK_SUFFIX, np.dtype(np.uint8), (n + 7) // 8))
            if bits[n:].any():
                raise CodecError("code", f"tensor {name!r}: padding bits of the mask are not 0")
            nonzero = bits[:n].view(bool)
            k = int(np.count_nonzero(nonzero))
            signs = np.unpackbits(tensors.take(name, SIGN_SUFFIX, np.dtype(np.uint8), (k + 7) // 8))
            if signs[k:].any():
                raise CodecError("code", f"tensor {name!r}: padding bits of the signs are not 0")
            codes = nonzero.view(np.int8).copy()  # 1 where non-zero
            codes[nonzero] -= 2 * signs[:k].view(np.int8)  # -1 where the sign bit is set
            out[name] = Codes(codes, scale, shape)
        return out

    def max_bytes(self, shape: Shape) -> int:
        return 4 + 2 * ((size(shape) + 7) // 8)


register(TernaryEF())
