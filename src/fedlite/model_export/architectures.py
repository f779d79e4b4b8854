"""Registry of model architectures that convert to builtins-only trainable TFLite models.

A builder returns a `ModelDef`: the ordered weight layout, a numpy initialiser and a TensorFlow
forward function producing logits. TensorFlow is imported only inside the forward functions, so
importing this module stays cheap. Every forward pass uses only constructs whose gradients are
TFLite builtins (see FACTS): convolution as im2col (`tf.gather` with constant indices + matmul),
pooling as reshape + `reduce_max`, relu as `tf.maximum(h, 0.)`, and no tensor above 4-D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Layout = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ModelDef:
    """One architecture instantiated for an input shape and a number of classes."""

    arch: str
    input_shape: tuple[int, ...]
    classes: int
    weights: Layout
    init: Callable[[np.random.Generator], dict[str, np.ndarray]]
    forward: Callable[[dict[str, Any], Any], Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.weights)


Builder = Callable[..., ModelDef]
_REGISTRY: dict[str, Builder] = {}


def register_architecture(name: str, builder: Builder) -> None:
    """Make `builder(input_shape, classes, **options) -> ModelDef` available as `name`."""
    if not name or not callable(builder):
        raise ValueError("register_architecture needs a name and a callable builder")
    _REGISTRY[name] = builder


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, input_shape: Sequence[int], classes: int, **options: Any) -> ModelDef:
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](tuple(int(d) for d in input_shape), int(classes), **options)


# ---------------------------------------------------------------- initialisation


def init_params(layout: Layout, rng: np.random.Generator, glorot: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """He-uniform kernels (Glorot-uniform for names in `glorot`), zero biases.

    A kernel's last axis is its output channel axis; fan-in is the product of the others.
    """
    params: dict[str, np.ndarray] = {}
    for name, shape in layout:
        if name.endswith("/bias"):
            params[name] = np.zeros(shape, np.float32)
            continue
        fan_in = math.prod(shape[:-1])
        fan_out = shape[-1]
        limit = math.sqrt(6.0 / (fan_in + fan_out)) if name in glorot else math.sqrt(6.0 / fan_in)
        params[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return params


def _initialiser(layout: Layout, last_kernel: str) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    return lambda rng: init_params(layout, rng, glorot=(last_kernel,))


# ---------------------------------------------------------------- building blocks (TensorFlow)


def _relu(h: Any) -> Any:
    import tensorflow as tf

    return tf.maximum(h, 0.0)


def _dense(params: dict[str, Any], name: str, h: Any) -> Any:
    import tensorflow as tf

    return tf.matmul(h, params[f"{name}/kernel"]) + params[f"{name}/bias"]


def _patch_indices(spatial: Sequence[int], kernel: int) -> np.ndarray:
    """Indices into the zero-padded, flattened input: one row of kernel**ndim taps per output position.

    'same' padding, stride 1; `spatial` is (T,) or (H, W). Taps are ordered like the kernel's
    leading axes, so gathered patches line up with `kernel.reshape(-1, filters)`.
    """
    pad = kernel // 2
    padded = [d + 2 * pad for d in spatial]
    rows = []
    for out in np.ndindex(*spatial):
        taps = [np.ravel_multi_index(tuple(o + k for o, k in zip(out, tap, strict=True)), padded)
                for tap in np.ndindex(*([kernel] * len(spatial)))]
        rows.append(taps)
    return np.asarray(rows, np.int32)


def _conv(params: dict[str, Any], name: str, h: Any, spatial: Sequence[int], kernel: int) -> Any:
    """'same' convolution of h [N, *spatial, C] by im2col; returns [N, *spatial, F]."""
    import tensorflow as tf

    pad = kernel // 2
    channels = int(h.shape[-1])
    w = params[f"{name}/kernel"]
    filters = int(w.shape[-1])
    padded = tf.pad(h, [[0, 0]] + [[pad, pad]] * len(spatial) + [[0, 0]])
    positions = math.prod(d + 2 * pad for d in spatial)
    flat = tf.reshape(padded, [-1, positions, channels])
    indices = _patch_indices(spatial, kernel)
    patches = tf.gather(flat, tf.constant(indices), axis=1)  # [N, P, K, C]
    cols = tf.reshape(patches, [-1, indices.shape[1] * channels])
    out = tf.matmul(cols, tf.reshape(w, [-1, filters])) + params[f"{name}/bias"]
    return tf.reshape(out, [-1, *spatial, filters])


def _pool2(h: Any, spatial: Sequence[int]) -> Any:
    """2x max pooling over each spatial axis, one 4-D reshape + reduce_max per axis."""
    import tensorflow as tf

    channels = int(h.shape[-1])
    if len(spatial) == 1:
        (t,) = spatial
        pooled = tf.reduce_max(tf.reshape(h, [-1, t // 2, 2, channels]), axis=2)
        return pooled
    hh, ww = spatial
    rows = tf.reduce_max(tf.reshape(h, [-1, 2, ww, channels]), axis=1)  # [N*H/2, W, C]
    cols = tf.reduce_max(tf.reshape(rows, [-1, 2, channels]), axis=1)  # [N*H/2*W/2, C]
    return tf.reshape(cols, [-1, hh // 2, ww // 2, channels])


def _poolable(spatial: Sequence[int]) -> bool:
    return all(d % 2 == 0 and d >= 2 for d in spatial)


def _ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


# ---------------------------------------------------------------- built-in architectures


def _dense_stack(layout: Layout, features: int, hidden: Sequence[int], classes: int, prefix: int = 0) -> list[str]:
    names = []
    sizes = [features, *hidden, classes]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        name = f"dense_{prefix + i}"
        layout += [(f"{name}/kernel", (n_in, n_out)), (f"{name}/bias", (n_out,))]
        names.append(name)
    return names


def _apply_dense_stack(params: dict[str, Any], names: list[str], h: Any) -> Any:
    for i, name in enumerate(names):
        h = _dense(params, name, h)
        if i < len(names) - 1:
            h = _relu(h)
    return h


def mlp(input_shape: tuple[int, ...], classes: int, hidden: Sequence[int] | str = (64, 32)) -> ModelDef:
    """Fully connected network on the flattened input, relu between layers."""
    hidden = _ints(hidden)
    features = math.prod(input_shape)
    layout: Layout = []
    names = _dense_stack(layout, features, hidden, classes)

    def forward(params: dict[str, Any], x: Any) -> Any:
        import tensorflow as tf

        return _apply_dense_stack(params, names, tf.reshape(x, [-1, features]))

    return ModelDef("mlp", input_shape, classes, layout, _initialiser(layout, layout[-2][0]), forward,
                    {"hidden": list(hidden)})


def _conv_net(arch: str, input_shape: tuple[int, ...], classes: int, filters: Sequence[int] | str,
              kernel_size: int, hidden: Sequence[int] | str) -> ModelDef:
    """Stack of ('same' conv, relu, 2x max pool) blocks, then a dense head."""
    filters, hidden = _ints(filters), _ints(hidden)
    ndim = len(input_shape) - 1
    if ndim not in (1, 2):
        raise ValueError(f"{arch}: input shape must be {'[T, C]' if ndim == 1 else '[H, W, C]'}, got {input_shape}")
    if kernel_size % 2 != 1:
        raise ValueError(f"{arch}: kernel_size must be odd, got {kernel_size}")
    layout: Layout = []
    blocks = []  # (name, spatial before, pool?)
    spatial, channels = list(input_shape[:-1]), input_shape[-1]
    for i, f in enumerate(filters):
        name = f"conv_{i}"
        layout += [(f"{name}/kernel", (*([kernel_size] * ndim), channels, f)), (f"{name}/bias", (f,))]
        pool = _poolable(spatial)
        blocks.append((name, tuple(spatial), pool))
        spatial = [d // 2 for d in spatial] if pool else spatial
        channels = f
    features = math.prod(spatial) * channels
    names = _dense_stack(layout, features, hidden, classes)

    def forward(params: dict[str, Any], x: Any) -> Any:
        import tensorflow as tf

        h = x
        for name, dims, pool in blocks:
            h = _relu(_conv(params, name, h, dims, kernel_size))
            if pool:
                h = _pool2(h, dims)
        return _apply_dense_stack(params, names, tf.reshape(h, [-1, features]))

    options = {"filters": list(filters), "kernel_size": kernel_size, "hidden": list(hidden)}
    return ModelDef(arch, input_shape, classes, layout, _initialiser(layout, layout[-2][0]), forward, options)


def cnn(input_shape: tuple[int, ...], classes: int, filters: Sequence[int] | str = (8, 16), kernel_size: int = 3,
        hidden: Sequence[int] | str = (32,)) -> ModelDef:
    """Image CNN for [H, W, C] inputs; a block pools only while both spatial sizes are even."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn: input shape must be [H, W, C], got {input_shape}")
    return _conv_net("cnn", input_shape, classes, filters, kernel_size, hidden)


def conv1d(input_shape: tuple[int, ...], classes: int, filters: Sequence[int] | str = (16, 32),
           kernel_size: int = 3, hidden: Sequence[int] | str = (32,)) -> ModelDef:
    """1-D CNN for sensor windows [T, channels]; a block pools only while T is even."""
    if len(input_shape) != 2:
        raise ValueError(f"conv1d: input shape must be [T, channels], got {input_shape}")
    return _conv_net("conv1d", input_shape, classes, filters, kernel_size, hidden)


register_architecture("mlp", mlp)
register_architecture("cnn", cnn)
register_architecture("conv1d", conv1d)
