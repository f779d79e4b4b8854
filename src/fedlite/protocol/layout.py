"""The weight layout a model manifest declares: named tensors <-> the flat vector the TFLite model takes."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlite.protocol.errors import ProtocolError


class LayoutError(ProtocolError):
    """Tensors that do not match the model's declared names and shapes."""


def weight_specs(manifest: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(w["name"], tuple(int(d) for d in w["shape"])) for w in manifest["weights"]]


def num_params(manifest: dict[str, Any]) -> int:
    return int(sum(int(np.prod(shape)) for _, shape in weight_specs(manifest)))


def check_tensors(tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Raise LayoutError unless `tensors` has exactly the manifest's names and shapes."""
    specs = dict(weight_specs(manifest))
    if set(tensors) != set(specs):
        missing, extra = sorted(set(specs) - set(tensors)), sorted(set(tensors) - set(specs))
        raise LayoutError("names", f"tensor names differ from the model: missing {missing[:3]}, extra {extra[:3]}")
    for name, shape in specs.items():
        if tuple(tensors[name].shape) != shape:
            raise LayoutError("shape", f"{name} has shape {tuple(tensors[name].shape)}, the model has {shape}")


def flatten(tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> np.ndarray:
    check_tensors(tensors, manifest)
    return np.concatenate(
        [np.asarray(tensors[name], np.float32).ravel() for name, _ in weight_specs(manifest)]
    ).astype(np.float32)


def unflatten(flat: np.ndarray, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    flat = np.asarray(flat, np.float32).ravel()
    if flat.size != num_params(manifest):
        raise LayoutError("shape", f"flat vector of {flat.size} values, the model has {num_params(manifest)}")
    out, offset = {}, 0
    for name, shape in weight_specs(manifest):
        size = int(np.prod(shape))
        out[name] = flat[offset : offset + size].reshape(shape).copy()
        offset += size
    return out
