"""``blob``: one uint8 tensor ``blob``, a file (model frames carry the .tflite model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlite.protocol.codecs.base import Codec, CodecError, Shape, Tensors, TensorSource, register, size


class Blob(Codec):
    name = "blob"
    kinds = ("model",)

    def encode(self, delta: Mapping[str, np.ndarray], *, rng: np.random.Generator | None = None,
               residual: Mapping[str, np.ndarray] | None = None) -> tuple[Tensors, Tensors | None]:
        return {"blob": np.frombuffer(bytes(delta["blob"]), dtype=np.uint8)}, None

    def decode(self, tensors: TensorSource, header: Any) -> Tensors:
        if [name for name, _ in tensors.weights] != ["blob"] or len(tensors.weights[0][1]) != 1:
            raise CodecError("tensor", "a model frame carries exactly one 1-D uint8 tensor named 'blob'")
        (name, shape), = tensors.weights
        return {name: tensors.take(name, "", np.dtype(np.uint8), size(shape))}

    def max_bytes(self, shape: Shape) -> int:
        return size(shape)


register(Blob())
