"""The `keras` architecture: a chain of layer specs (JSON, kept in the manifest's options) as a builtins-only ModelDef.

`options["layers"]` is a list of dicts, each with a `type` from LAYERS; the builder walks it from the input shape,
checks every shape, lays out the weights (`<name>/kernel`, `<name>/bias`, Keras's shapes) and composes a forward
function from the same TFLite-builtin constructs as the built-in architectures: convolution as im2col (pad +
`tf.gather` with constant indices + matmul, any stride, dilation and 'same'/'valid' padding), pooling as slice +
reshape + reduce, activations from elementwise builtins. `fedlite.model_export.keras_import` writes these specs
from a Keras model; the same spec re-exports the model with other weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .architectures import Layout, ModelDef, init_params, register_architecture

Shape = tuple[int, ...]
Apply = Callable[[dict[str, Any], Any], Any]


@dataclass(frozen=True)
class Placed:
    """One layer spec placed at an input shape: its weights, output shape and forward step."""

    weights: Layout
    shape: Shape
    apply: Apply


# ---------------------------------------------------------------- activations (TensorFlow, builtins only)


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _leaky_relu(h: Any, slope: float) -> Any:
    tf = _tf()
    return tf.add_n([tf.maximum(h, 0.0), -slope * tf.maximum(-h, 0.0)])


def _elu(h: Any) -> Any:
    tf = _tf()
    return tf.add_n([tf.maximum(h, 0.0), tf.exp(-tf.maximum(-h, 0.0)) - 1.0])


# Each gradient must be TFLite builtins with a dynamic batch axis: a binary op between two batch-shaped tensors
# (h * sigmoid(h), maximum(h, a * h)) takes a BroadcastGradientArgs in its gradient, which is not a builtin, so
# sums are `add_n` (its gradient passes through) and the rest unary ops, ops with a scalar, or TensorFlow's own.
ACTIVATIONS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "linear": lambda h, spec: h,
    "relu": lambda h, spec: _tf().maximum(h, 0.0),
    "relu6": lambda h, spec: _tf().minimum(_tf().maximum(h, 0.0), 6.0),
    "leaky_relu": lambda h, spec: _leaky_relu(h, float(spec.get("negative_slope", 0.2))),
    "elu": lambda h, spec: _elu(h),
    "sigmoid": lambda h, spec: _tf().sigmoid(h),
    "tanh": lambda h, spec: _tf().tanh(h),
    "silu": lambda h, spec: _tf().nn.silu(h),
}


def _activation(spec: dict[str, Any]) -> Callable[[Any], Any]:
    name = spec.get("activation", "linear")
    if name not in ACTIVATIONS:
        raise ValueError(f"layer {spec.get('name', spec['type'])!r}: unsupported activation {name!r}; supported: "
                         f"{', '.join(ACTIVATIONS)} (softmax only as the last layer's)")
    fn = ACTIVATIONS[name]
    return lambda h: fn(h, spec)


# ---------------------------------------------------------------- layers


def _name(spec: dict[str, Any]) -> str:
    return str(spec["name"])


def _dense(spec: dict[str, Any], shape: Shape) -> Placed:
    """Dense on the last axis (as Keras applies it to inputs of any rank)."""
    name, units, features = _name(spec), int(spec["units"]), shape[-1]
    weights: Layout = [(f"{name}/kernel", (features, units))]
    if spec.get("bias", True):
        weights.append((f"{name}/bias", (units,)))
    act = _activation(spec)

    def apply(params: dict[str, Any], h: Any) -> Any:
        tf = _tf()
        flat = tf.reshape(h, [-1, features]) if len(shape) > 1 else h
        out = tf.matmul(flat, params[f"{name}/kernel"])
        if spec.get("bias", True):
            out = out + params[f"{name}/bias"]
        return act(tf.reshape(out, [-1, *shape[:-1], units]) if len(shape) > 1 else out)

    return Placed(weights, (*shape[:-1], units), apply)


def conv_geometry(spatial: Shape, kernel: Shape, strides: Shape, dilation: Shape,
                  padding: str) -> tuple[list[tuple[int, int]], Shape]:
    """(pad before/after per axis, output spatial shape) of a convolution, as TensorFlow pads 'same' and 'valid'."""
    pads, out = [], []
    for d, k, s, r in zip(spatial, kernel, strides, dilation, strict=True):
        span = (k - 1) * r + 1
        if padding == "same":
            o = -(-d // s)
            total = max((o - 1) * s + span - d, 0)
            pads.append((total // 2, total - total // 2))
        else:
            o = (d - span) // s + 1
            pads.append((0, 0))
        out.append(o)
    return pads, tuple(out)


def patch_indices(spatial: Shape, kernel: Shape, strides: Shape, dilation: Shape,
                  pads: Sequence[tuple[int, int]], out: Shape) -> np.ndarray:
    """Indices into the padded, flattened input: one row of prod(kernel) taps per output position, taps ordered like
    the kernel's leading axes (so gathered patches line up with `kernel.reshape(-1, filters)`)."""
    padded = tuple(d + a + b for d, (a, b) in zip(spatial, pads, strict=True))
    rows = []
    for position in np.ndindex(*out):
        rows.append([np.ravel_multi_index(tuple(o * s + t * r for o, s, t, r in
                                                zip(position, strides, tap, dilation, strict=True)), padded)
                     for tap in np.ndindex(*kernel)])
    return np.asarray(rows, np.int32)


def _conv(spec: dict[str, Any], shape: Shape) -> Placed:
    name, filters = _name(spec), int(spec["filters"])
    spatial, channels = shape[:-1], shape[-1]
    kernel, strides, dilation = (tuple(int(v) for v in spec[k]) for k in ("kernel", "strides", "dilation"))
    padding = spec.get("padding", "valid")
    if len(spatial) not in (1, 2) or len(kernel) != len(spatial):
        raise ValueError(f"layer {name!r}: a {len(kernel)}-D convolution needs a [{'T' if len(kernel) == 1 else 'H, W'}"
                         f", C] input, got {list(shape)}")
    if padding not in ("same", "valid"):
        raise ValueError(f"layer {name!r}: padding {padding!r} is not supported (same or valid)")
    pads, out = conv_geometry(spatial, kernel, strides, dilation, padding)
    if min(out) < 1:
        raise ValueError(f"layer {name!r}: the kernel is larger than its input {list(shape)}")
    indices = patch_indices(spatial, kernel, strides, dilation, pads, out)
    weights: Layout = [(f"{name}/kernel", (*kernel, channels, filters))]
    if spec.get("bias", True):
        weights.append((f"{name}/bias", (filters,)))
    act = _activation(spec)
    positions = math.prod(d + a + b for d, (a, b) in zip(spatial, pads, strict=True))

    def apply(params: dict[str, Any], h: Any) -> Any:
        tf = _tf()
        if any(a or b for a, b in pads):
            h = tf.pad(h, [[0, 0], *[[a, b] for a, b in pads], [0, 0]])
        flat = tf.reshape(h, [-1, positions, channels])
        patches = tf.gather(flat, tf.constant(indices), axis=1)  # [N, P, K, C]
        cols = tf.reshape(patches, [-1, indices.shape[1] * channels])
        y = tf.matmul(cols, tf.reshape(params[f"{name}/kernel"], [-1, filters]))
        if spec.get("bias", True):
            y = y + params[f"{name}/bias"]
        return act(tf.reshape(y, [-1, *out, filters]))

    return Placed(weights, (*out, filters), apply)


def _pool(reduce: str) -> Callable[[dict[str, Any], Shape], Placed]:
    """Non-overlapping pooling (strides = pool size, 'valid'): slice off the remainder, then reshape + reduce."""

    def place(spec: dict[str, Any], shape: Shape) -> Placed:
        spatial, channels = shape[:-1], shape[-1]
        pool = tuple(int(v) for v in spec["pool"])
        if len(spatial) not in (1, 2) or len(pool) != len(spatial):
            raise ValueError(f"layer {spec.get('name')!r}: {len(pool)}-D pooling of a {list(shape)} input")
        out = tuple(d // p for d, p in zip(spatial, pool, strict=True))
        if min(out) < 1:
            raise ValueError(f"layer {spec.get('name')!r}: pool {list(pool)} is larger than its input {list(shape)}")
        crop = tuple(o * p for o, p in zip(out, pool, strict=True))

        def apply(params: dict[str, Any], h: Any) -> Any:
            tf = _tf()
            fn = tf.reduce_max if reduce == "max" else tf.reduce_mean
            if crop != spatial:
                h = tf.slice(h, [0] * (len(shape) + 1), [-1, *crop, channels])
            if len(spatial) == 1:
                return fn(tf.reshape(h, [-1, out[0], pool[0], channels]), axis=2)
            rows = fn(tf.reshape(h, [-1, pool[0], crop[1], channels]), axis=1)  # [N*H', W, C]
            cols = fn(tf.reshape(rows, [-1, pool[1], channels]), axis=1)  # [N*H'*W', C]
            return tf.reshape(cols, [-1, *out, channels])

        return Placed([], (*out, channels), apply)

    return place


def _global_pool(reduce: str) -> Callable[[dict[str, Any], Shape], Placed]:
    def place(spec: dict[str, Any], shape: Shape) -> Placed:
        if len(shape) < 2:
            raise ValueError(f"layer {spec.get('name')!r}: global pooling needs a [*spatial, C] input, got "
                             f"{list(shape)}")
        positions, channels = math.prod(shape[:-1]), shape[-1]

        def apply(params: dict[str, Any], h: Any) -> Any:
            tf = _tf()
            fn = tf.reduce_max if reduce == "max" else tf.reduce_mean
            return fn(tf.reshape(h, [-1, positions, channels]), axis=1)

        return Placed([], (channels,), apply)

    return place


def _reshape_to(target: Shape) -> Apply:
    return lambda params, h: _tf().reshape(h, [-1, *target])


def _flatten(spec: dict[str, Any], shape: Shape) -> Placed:
    return Placed([], (math.prod(shape),), _reshape_to((math.prod(shape),)))


def _reshape(spec: dict[str, Any], shape: Shape) -> Placed:
    target = tuple(int(v) for v in spec["shape"])
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target = tuple(math.prod(shape) // known if d == -1 else d for d in target)
    if math.prod(target) != math.prod(shape) or len(target) > 3:
        raise ValueError(f"layer {spec.get('name')!r}: cannot reshape {list(shape)} to {list(target)} "
                         "(at most 3 axes besides the batch)")
    return Placed([], target, _reshape_to(target))


def _activation_layer(spec: dict[str, Any], shape: Shape) -> Placed:
    act = _activation(spec)
    return Placed([], shape, lambda params, h: act(h))


LAYERS: dict[str, Callable[[dict[str, Any], Shape], Placed]] = {
    "dense": _dense,
    "conv": _conv,
    "max_pool": _pool("max"),
    "avg_pool": _pool("avg"),
    "global_max_pool": _global_pool("max"),
    "global_avg_pool": _global_pool("avg"),
    "flatten": _flatten,
    "reshape": _reshape,
    "activation": _activation_layer,
}


# ---------------------------------------------------------------- the architecture


def place_layers(specs: Sequence[dict[str, Any]], input_shape: Shape) -> tuple[list[Placed], Shape]:
    """Every spec placed in order from `input_shape`; the output shape. ValueError naming a layer that does not fit."""
    placed, shape = [], tuple(input_shape)
    for spec in specs:
        kind = spec.get("type")
        if kind not in LAYERS:
            raise ValueError(f"unknown layer type {kind!r}; known: {', '.join(LAYERS)}")
        if len(shape) + 1 > 4:
            raise ValueError(f"layer {spec.get('name', kind)!r}: inputs above 4-D (with the batch) are not supported")
        layer = LAYERS[kind](dict(spec), shape)
        placed.append(layer)
        shape = layer.shape
    return placed, shape


def layer_stack(input_shape: Shape, classes: int, layers: Sequence[dict[str, Any]] | None = None) -> ModelDef:
    """The ModelDef of `layers` (specs, see the module docstring); its last layer must output [classes] logits."""
    if not layers:
        raise ValueError("the keras architecture needs options.layers (export a Keras model with "
                         "`fedlite export --keras MODEL.keras`)")
    placed, out = place_layers(layers, tuple(input_shape))
    if out != (classes,):
        raise ValueError(f"the last layer outputs {list(out)}, expected [{classes}] logits (one per class)")
    layout: Layout = [w for layer in placed for w in layer.weights]
    names = [name for name, _ in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"two layers share a weight name in {names}")
    kernels = [n for n in names if n.endswith("/kernel")]

    def forward(params: dict[str, Any], x: Any) -> Any:
        h = x
        for layer in placed:
            h = layer.apply(params, h)
        return h

    def init(rng: np.random.Generator) -> dict[str, np.ndarray]:
        return init_params(layout, rng, glorot=kernels[-1:])

    return ModelDef("keras", tuple(input_shape), classes, layout, init, forward, {"layers": [dict(s) for s in layers]})


register_architecture("keras", layer_stack)
