"""A tf.keras model as fedlite's trainable model: its layers translated to `keras` layer specs, its weights kept.

`translate(model)` walks a Sequential or functional model that is one chain of layers, maps each layer through
TRANSLATORS (keyed by the Keras class name) and returns (ModelDef, weights); `from_keras(model, out_dir)` exports
it like any architecture (same signatures and manifest, builtins only). A final softmax is dropped (fedlite trains
on logits; `infer` applies it); Dropout is the identity at export. Anything else is a one-line KerasImportError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .architectures import ModelDef
from .layer_stack import ACTIVATIONS, layer_stack

Spec = dict[str, Any]
Translated = tuple[list[Spec], dict[str, np.ndarray]]
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")  # a weight name is `<layer>/kernel`: within the wire's tensor names


class KerasImportError(ValueError):
    """The Keras model cannot be exported; the message names the layer or setting."""


# ---------------------------------------------------------------- one layer


def _pair(value: Any, rank: int) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list | tuple) else [value] * rank)]


def _act(layer: Any, value: Any) -> str:
    name = value if isinstance(value, str) else getattr(value, "__name__", repr(value))
    name = {"swish": "silu"}.get(name, name)
    if name not in (*ACTIVATIONS, "softmax"):
        raise KerasImportError(f"Keras layer {type(layer).__name__} ({layer.name}): activation {name!r} is not "
                               f"supported; supported: {', '.join(ACTIVATIONS)}, softmax (last layer only)")
    return name


def _check(layer: Any, ok: bool, what: str) -> None:
    if not ok:
        raise KerasImportError(f"Keras layer {type(layer).__name__} ({layer.name}): {what}")


def _weights(layer: Any, spec: Spec) -> dict[str, np.ndarray]:
    values = layer.get_weights()
    names = [f"{layer.name}/kernel"] + ([f"{layer.name}/bias"] if spec["bias"] else [])
    return {n: np.asarray(v, np.float32) for n, v in zip(names, values, strict=True)}


def _dense(layer: Any) -> Translated:
    config = layer.get_config()
    spec = {"type": "dense", "name": layer.name, "units": int(config["units"]),
            "activation": _act(layer, config.get("activation", "linear")), "bias": bool(config.get("use_bias", True))}
    return [spec], _weights(layer, spec)


def _conv(rank: int) -> Callable[[Any], Translated]:
    def translate(layer: Any) -> Translated:
        config = layer.get_config()
        _check(layer, config.get("data_format", "channels_last") in ("channels_last", None),
               "only data_format channels_last is supported")
        _check(layer, int(config.get("groups", 1)) == 1, "grouped convolution (groups > 1) is not supported")
        padding = str(config.get("padding", "valid")).lower()
        _check(layer, padding in ("same", "valid"), f"padding {padding!r} is not supported (same or valid)")
        spec = {"type": "conv", "name": layer.name, "filters": int(config["filters"]),
                "kernel": _pair(config["kernel_size"], rank), "strides": _pair(config.get("strides", 1), rank),
                "dilation": _pair(config.get("dilation_rate", 1), rank), "padding": padding,
                "activation": _act(layer, config.get("activation", "linear")),
                "bias": bool(config.get("use_bias", True))}
        return [spec], _weights(layer, spec)

    return translate


def _pool(kind: str, rank: int) -> Callable[[Any], Translated]:
    def translate(layer: Any) -> Translated:
        config = layer.get_config()
        pool = _pair(config["pool_size"], rank)
        strides = _pair(config.get("strides") or pool, rank)
        _check(layer, strides == pool, f"strides {strides} must equal pool_size {pool} (non-overlapping pooling)")
        _check(layer, str(config.get("padding", "valid")).lower() == "valid", "only padding 'valid' is supported")
        _check(layer, config.get("data_format", "channels_last") in ("channels_last", None),
               "only data_format channels_last is supported")
        return [{"type": kind, "name": layer.name, "pool": pool}], {}

    return translate


def _global_pool(kind: str) -> Callable[[Any], Translated]:
    def translate(layer: Any) -> Translated:
        config = layer.get_config()
        _check(layer, not config.get("keepdims", False), "keepdims=True is not supported")
        _check(layer, config.get("data_format", "channels_last") in ("channels_last", None),
               "only data_format channels_last is supported")
        return [{"type": kind, "name": layer.name}], {}

    return translate


def _nothing(layer: Any) -> Translated:
    return [], {}


def _flatten(layer: Any) -> Translated:
    return [{"type": "flatten", "name": layer.name}], {}


def _reshape(layer: Any) -> Translated:
    return [{"type": "reshape", "name": layer.name, "shape": [int(d) for d in layer.get_config()["target_shape"]]}], {}


def _activation(layer: Any) -> Translated:
    return [{"type": "activation", "name": layer.name, "activation": _act(layer, layer.get_config()["activation"])}], {}


def _relu(layer: Any) -> Translated:
    config = layer.get_config()
    max_value, slope, threshold = config.get("max_value"), float(config.get("negative_slope", 0.0)), \
        float(config.get("threshold", 0.0))
    _check(layer, threshold == 0.0, "a non-zero threshold is not supported")
    if max_value is not None:
        _check(layer, float(max_value) == 6.0 and slope == 0.0, "max_value other than 6 is not supported")
        return [{"type": "activation", "name": layer.name, "activation": "relu6"}], {}
    if slope:
        return [{"type": "activation", "name": layer.name, "activation": "leaky_relu", "negative_slope": slope}], {}
    return [{"type": "activation", "name": layer.name, "activation": "relu"}], {}


def _leaky_relu(layer: Any) -> Translated:
    slope = float(layer.get_config().get("negative_slope", layer.get_config().get("alpha", 0.3)))
    return [{"type": "activation", "name": layer.name, "activation": "leaky_relu", "negative_slope": slope}], {}


def _softmax(layer: Any) -> Translated:
    axis = layer.get_config().get("axis", -1)
    _check(layer, axis in (-1, [-1]), "softmax over an axis other than the last is not supported")
    return [{"type": "activation", "name": layer.name, "activation": "softmax"}], {}


TRANSLATORS: dict[str, Callable[[Any], Translated]] = {
    "Dense": _dense,
    "Conv1D": _conv(1),
    "Conv2D": _conv(2),
    "MaxPooling1D": _pool("max_pool", 1),
    "MaxPooling2D": _pool("max_pool", 2),
    "AveragePooling1D": _pool("avg_pool", 1),
    "AveragePooling2D": _pool("avg_pool", 2),
    "GlobalMaxPooling1D": _global_pool("global_max_pool"),
    "GlobalMaxPooling2D": _global_pool("global_max_pool"),
    "GlobalAveragePooling1D": _global_pool("global_avg_pool"),
    "GlobalAveragePooling2D": _global_pool("global_avg_pool"),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Dropout": _nothing,  # identity at export (and at inference in Keras)
    "Activation": _activation,
    "ReLU": _relu,
    "LeakyReLU": _leaky_relu,
    "Softmax": _softmax,
}


def supported_layers() -> list[str]:
    return list(TRANSLATORS)


# ---------------------------------------------------------------- the model


def _chain(model: Any) -> list[Any]:
    """The model's layers in order, if it is one chain (each layer fed by the one before); else KerasImportError."""
    import keras

    kind = type(model).__name__
    if not isinstance(model, keras.Model) or not (isinstance(model, keras.Sequential) or kind == "Functional"):
        raise KerasImportError(f"{kind} is not a Keras Sequential or functional model (a subclassed keras.Model has "
                               "no layer graph to translate)")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError) as exc:
        raise KerasImportError(f"Keras model {model.name} has no input shape yet: start it with keras.Input "
                               f"({exc})") from None
    if len(inputs) != 1 or len(outputs) != 1:
        raise KerasImportError(f"Keras model {model.name} has {len(inputs)} inputs and {len(outputs)} outputs; "
                               "fedlite exports one input and one output")
    layers, tensor = [], outputs[0]
    while tensor is not inputs[0]:  # from the output back to the input, through the node that made each tensor
        layer, node_index, _ = tensor._keras_history
        fed = layer._inbound_nodes[node_index].input_tensors
        if type(layer).__name__ == "InputLayer" or len(fed) != 1:
            raise KerasImportError(f"Keras model {model.name} is not a single chain of layers: {type(layer).__name__} "
                                   f"({layer.name}) takes {len(fed)} inputs (branches and merges cannot be exported)")
        layers.append(layer)
        tensor = fed[0]
    return layers[::-1]


def _drop_final_softmax(specs: list[Spec]) -> list[Spec]:
    """fedlite trains on logits: a last softmax (an activation or a layer's) is dropped; anywhere else it is an
    error."""
    specs = [dict(s) for s in specs]
    if specs and specs[-1]["type"] == "activation" and specs[-1]["activation"] == "softmax":
        specs.pop()
    elif specs and specs[-1].get("activation") == "softmax":
        specs[-1]["activation"] = "linear"
    for spec in specs:
        if spec.get("activation") == "softmax":
            raise KerasImportError(f"Keras layer {spec['name']}: softmax is supported only as the last layer's "
                                   "activation (fedlite trains on logits)")
    if specs and specs[-1].get("activation", "linear") != "linear":
        raise KerasImportError(f"Keras layer {specs[-1]['name']}: the last layer must output logits or softmax "
                               f"probabilities, not {specs[-1]['activation']}")
    return specs


def translate(model: Any) -> tuple[ModelDef, dict[str, np.ndarray]]:
    """(the `keras` ModelDef, the model's weights by name) of a Keras model; KerasImportError naming what does not
    map."""
    specs: list[Spec] = []
    weights: dict[str, np.ndarray] = {}
    for layer in _chain(model):
        kind = type(layer).__name__
        if kind not in TRANSLATORS:
            raise KerasImportError(f"unsupported Keras layer {kind} ({layer.name}); supported: "
                                   f"{', '.join(supported_layers())}")
        if not NAME.match(layer.name):
            raise KerasImportError(f"Keras layer {kind} ({layer.name}): rename it to letters, digits, _ . - "
                                   "(its name names its weights on the wire)")
        layer_specs, layer_weights = TRANSLATORS[kind](layer)
        specs += layer_specs
        weights.update(layer_weights)
    input_shape = tuple(model.inputs[0].shape[1:])
    if not input_shape or any(d is None for d in input_shape):
        raise KerasImportError(f"Keras model {model.name} has input shape {list(input_shape)}: every axis but the "
                               "batch must have a fixed size")
    output = model.outputs[0].shape
    if len(output) != 2 or output[-1] is None or int(output[-1]) < 2:
        raise KerasImportError(f"Keras model {model.name} outputs {list(output)}: a classifier outputs [batch, "
                               "classes] with at least 2 classes")
    try:
        model_def = layer_stack(tuple(int(d) for d in input_shape), int(output[-1]), _drop_final_softmax(specs))
    except KerasImportError:
        raise
    except ValueError as exc:
        raise KerasImportError(f"Keras model {model.name}: {exc}") from None
    return model_def, weights


def load(path: str | os.PathLike[str]) -> Any:
    """A saved Keras model (.keras or .h5), without its training configuration; KerasImportError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KerasImportError(f"no Keras model file at {path}")
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file; each means the same here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KerasImportError(f"cannot load the Keras model {path}: {first}") from None


def from_keras(model: Any, out_dir: str | os.PathLike[str], *, representative: np.ndarray | None = None,
               seed: int = 0) -> Mapping[str, Any]:
    """Export a Keras model (or the path of a saved one) like `export_model`: train.tflite, infer_int8.tflite and
    manifest.json in `out_dir`, the Keras weights baked in; returns the manifest."""
    from .convert import export_model

    if isinstance(model, str | os.PathLike):
        model = load(model)
    model_def, weights = translate(model)
    return export_model("keras", model_def.input_shape, model_def.classes, out_dir, weights=weights,
                        representative=representative, seed=seed, options=model_def.options)
