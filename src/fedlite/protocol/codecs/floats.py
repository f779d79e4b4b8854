"""``float32`` and ``float16``: each weight as is (downlink weights)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlite.protocol.codecs.base import Codec, CodecError, Shape, Tensors, TensorSource, register, size


class Float(Codec):
    """Each weight ``W`` as a tensor of its own shape in the codec's dtype; NaN and Inf are refused."""

    kinds = ("weights",)

    def __init__(self, dtype: type[np.floating[Any]]) -> None:
        self.dtype = np.dtype(dtype)
        self.name = self.dtype.name

    def encode(self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator | None = None,
               residual: Mapping[str, np.ndarray] | None = None) -> tuple[Tensors, Tensors | None]:
        return {name: np.asarray(value).astype(self.dtype) for name, value in delta.items()}, None

    def decode(self, tensors: TensorSource, header: Any) -> Tensors:
        out: Tensors = {}
        for name, shape in tensors.weights:
            value = tensors.take(name, "", self.dtype, size(shape)).astype(np.float32).reshape(shape)
            if not tensors.allow_nonfinite and not np.all(np.isfinite(value)):
                raise CodecError("nonfinite", f"tensor {name!r} holds NaN or Inf")
            out[name] = value
        return out

    def max_bytes(self, shape: Shape) -> int:
        return self.dtype.itemsize * size(shape)


register(Float(np.float16))
register(Float(np.float32))
