"""Export an architecture as a builtins-only trainable TFLite model, an int8 inference model and a manifest."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.protocol import manifest as mf

from .architectures import ModelDef, build

log = logging.getLogger("fedlite.export")
_said: set[str] = set()  # warnings said once per process (an aggregator exports every round)

REPRESENTATIVE_SAMPLES = 256


class ConversionError(RuntimeError):
    """The model does not convert to (or run as) a builtins-only TFLite model."""


# ---------------------------------------------------------------- inspecting .tflite files


def _builtin_names() -> dict[int, str]:
    try:
        from ai_edge_litert.schema_py_generated import BuiltinOperator
    except ImportError:
        from tensorflow.lite.python.schema_py_generated import BuiltinOperator
    return {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def tflite_ops(model: bytes | str | os.PathLike[str]) -> list[str]:
    """Sorted names of the operators a .tflite model uses; custom ops appear as `CUSTOM:<code>`."""
    data = model if isinstance(model, bytes | bytearray) else Path(model).read_bytes()
    schema = _schema()
    names = _builtin_names()
    parsed = schema.Model.GetRootAs(bytearray(data), 0)
    ops = set()
    for i in range(parsed.OperatorCodesLength()):
        code = parsed.OperatorCodes(i)
        builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.CustomCode()
            name = "CUSTOM:" + (custom.decode() if isinstance(custom, bytes) else str(custom))
        ops.add(name)
    return sorted(ops)


def check_builtins_only(ops: Sequence[str], what: str = "model") -> None:
    bad = [op for op in ops if op.startswith("CUSTOM") or "Flex" in op]
    if bad:
        raise ConversionError(f"{what} needs non-builtin ops {bad}; devices run TFLite builtins only "
                              "(see the rewrites in the architecture module)")


# ---------------------------------------------------------------- conversion


def convert_trainable(module: Any, signatures: Sequence[str] = mf.EXPORTED_SIGNATURES) -> bytes:
    """The TFLite model of a TrainableModel with the given signatures (builtins only)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="fedlite-savedmodel-") as tmp:
        tf.saved_model.save(module, tmp, signatures=module.signatures(signatures))
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.experimental_enable_resource_variables = True
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return converter.convert()
        except Exception as e:  # the converter raises several types; all mean the same here
            raise ConversionError(f"trainable model did not convert with TFLite builtins only: {e}") from e


def calibration_samples(input_shape: Sequence[int], samples: np.ndarray | None,
                        seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The int8 model's calibration inputs and what the manifest records of them: given samples (their count and
    range), or, without any, uniform [0, 1) draws (an assumption, said so). ConversionError if the given samples
    do not have the model's input shape."""
    shape = tuple(int(d) for d in input_shape)
    if samples is None:
        rng = np.random.default_rng(seed)
        drawn = rng.uniform(0.0, 1.0, size=(REPRESENTATIVE_SAMPLES, *shape)).astype(np.float32)
        return drawn, {"source": "assumed uniform", "range": [0.0, 1.0], "samples": REPRESENTATIVE_SAMPLES}
    samples = np.asarray(samples, np.float32)
    if samples.ndim < 1 or tuple(samples.shape[1:]) != shape or len(samples) == 0:
        raise ConversionError(f"calibration inputs have shape {list(samples.shape)}, the model's input is "
                              f"{list(shape)} (expected [N, {', '.join(map(str, shape))}])")
    if not np.isfinite(samples).all():
        raise ConversionError("calibration inputs hold NaN or infinite values")
    samples = samples[:REPRESENTATIVE_SAMPLES]
    return samples, {"source": "given", "range": [float(samples.min()), float(samples.max())],
                     "samples": len(samples)}


def _representative(samples: np.ndarray) -> Callable[[], Iterator[list]]:
    def dataset() -> Iterator[list]:
        for sample in samples:
            yield [sample[None]]

    return dataset


def _convert_int8(model_def: ModelDef, params: Mapping[str, np.ndarray], representative: np.ndarray) -> bytes:
    import tensorflow as tf

    holder = tf.Module(name="fedlite_infer")
    constants = {name: tf.constant(value) for name, value in params.items()}

    @tf.function(input_signature=[tf.TensorSpec([None, *model_def.input_shape], tf.float32, name="x")])
    def infer(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": tf.nn.softmax(model_def.forward(constants, x))}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([infer.get_concrete_function()], holder)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    try:
        return converter.convert()
    except Exception as e:
        raise ConversionError(f"int8 inference model did not convert: {e}") from e


def _check_signatures(train: bytes, specs: Mapping[str, Any]) -> None:
    from fedlite.runtime.interpreter import load_interpreter

    found = load_interpreter(train).get_signature_list()
    for name, spec in specs.items():
        got = found.get(name)
        if got is None or sorted(got["inputs"]) != sorted(spec["inputs"]) \
                or sorted(got["outputs"]) != sorted(spec["outputs"]):
            raise ConversionError(f"signature {name!r} of the converted model is {got}, expected {spec}")


def _int8_quantization(model: bytes) -> dict[str, Any]:
    from fedlite.runtime.interpreter import load_interpreter

    interpreter = load_interpreter(model)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if inp["dtype"] != np.int8 or out["dtype"] != np.int8:
        raise ConversionError(f"int8 model has {inp['dtype']} input and {out['dtype']} output")
    (in_scale, in_zp), (out_scale, out_zp) = inp["quantization"], out["quantization"]
    return {"input_scale": float(in_scale), "input_zero_point": int(in_zp), "output_scale": float(out_scale),
            "output_zero_point": int(out_zp), "output": "probabilities"}


# ---------------------------------------------------------------- export


def resolve(arch: str, input_shape: Sequence[int], classes: int, options: Mapping[str, Any] | None = None,
            builder: Callable[..., ModelDef] | None = None) -> ModelDef:
    """The ModelDef for a registered architecture, or for `builder` (labelled `arch`)."""
    shape = tuple(int(d) for d in input_shape)
    if builder is None:
        return build(arch, shape, int(classes), **dict(options or {}))
    model_def = builder(shape, int(classes), **dict(options or {}))
    if not isinstance(model_def, ModelDef):
        raise TypeError(f"builder {arch!r} returned {type(model_def).__name__}, expected a ModelDef")
    return model_def


def _manifest(model_def: ModelDef, arch: str) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "arch": arch,
        "options": mf.json_safe(model_def.options),
        "input": {"shape": list(model_def.input_shape), "dtype": "float32"},
        "classes": model_def.classes,
        "weights": mf.weight_entries(model_def.weights),
        "num_params": model_def.num_params,
        "signatures": mf.signature_specs(model_def.input_shape, model_def.classes, model_def.num_params),
        "exporter_version": mf.EXPORTER_VERSION,
    }
    manifest["model_hash"] = mf.compute_model_hash(manifest)
    return manifest


def export_model(arch: str, input_shape: Sequence[int], classes: int, out_dir: str | os.PathLike[str], *,
                 weights: Mapping[str, np.ndarray] | None = None, representative: np.ndarray | None = None,
                 seed: int = 0, options: Mapping[str, Any] | None = None,
                 builder: Callable[..., ModelDef] | None = None) -> dict[str, Any]:
    """Write train.tflite, infer_int8.tflite and manifest.json into `out_dir`; return the manifest.

    `weights` (named arrays) replaces the seed's initial weights, e.g. to re-export a round's global
    model; `representative` are calibration inputs for the int8 model (default: uniform [0, 1)
    samples drawn with `seed`). `builder` exports an unregistered architecture under the label `arch`.
    """
    import tensorflow as tf

    from .trainable import initial_weights, make_module

    started = time.perf_counter()
    model_def = resolve(arch, input_shape, classes, options, builder)
    params = initial_weights(model_def, weights, seed)
    manifest = _manifest(model_def, arch)

    train = convert_trainable(make_module(model_def, params))
    check_builtins_only(tflite_ops(train), "train.tflite")
    _check_signatures(train, manifest["signatures"])
    samples, calibration = calibration_samples(model_def.input_shape, representative, seed)
    if representative is None and "uniform" not in _said:
        _said.add("uniform")
        log.warning("int8 model calibrated on assumed uniform [0, 1) inputs (no calibration data): give "
                    "representative inputs if yours are not in [0, 1) (recorded in manifest.json)")
    infer = _convert_int8(model_def, params, samples)
    check_builtins_only(tflite_ops(infer), "infer_int8.tflite")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mf.write_atomic(out / mf.TRAIN_FILE, train)
    mf.write_atomic(out / mf.INFER_INT8_FILE, infer)
    manifest["files"] = {"train": mf.file_entry(out / mf.TRAIN_FILE),
                         "infer_int8": {**mf.file_entry(out / mf.INFER_INT8_FILE), **_int8_quantization(infer),
                                        "calibration": calibration}}
    manifest["tensorflow_version"] = tf.__version__
    manifest["export_seconds"] = round(time.perf_counter() - started, 3)
    mf.write_manifest(out, manifest)
    return manifest
