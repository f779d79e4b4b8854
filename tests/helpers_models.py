"""Shared data and a user-defined architecture for the model export and trainer tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlite.model_export.architectures import ModelDef, init_params

DIGITS_SEED = 0


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's bundled digits scaled to [0, 1]: stratified 75/25 split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, stratify=digits.target,
                                                        random_state=DIGITS_SEED)
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def export_digits_mlp(out: Any) -> tuple[dict[str, Any], bytes, dict[str, np.ndarray]]:
    """A real trainable export of the digits MLP into `out`: manifest, train.tflite bytes, random weights."""
    from fedlite.model_export.convert import export_model
    from fedlite.protocol.layout import num_params, unflatten

    manifest = export_model("mlp", (64,), 10, out)
    rng = np.random.default_rng(0)
    weights = unflatten(rng.normal(0, 0.1, num_params(manifest)).astype(np.float32), manifest)
    return manifest, (out / "train.tflite").read_bytes(), weights


def softmax_regression(input_shape: tuple[int, ...], classes: int, **options: Any) -> ModelDef:
    """A user's own builder: linear softmax regression on the flattened input."""
    features = int(np.prod(input_shape))
    layout = [("linear/kernel", (features, classes)), ("linear/bias", (classes,))]

    def forward(params: dict[str, Any], x: Any) -> Any:
        import tensorflow as tf

        return tf.matmul(tf.reshape(x, [-1, features]), params["linear/kernel"]) + params["linear/bias"]

    return ModelDef("softmax_regression", tuple(input_shape), classes, layout,
                    lambda rng: init_params(layout, rng, glorot=("linear/kernel",)), forward, dict(options))


def int8_accuracy(model: bytes, quantization: dict[str, Any], x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the full-integer inference model: quantize inputs, argmax the int8 outputs."""
    from fedlite.runtime.interpreter import load_interpreter

    interpreter = load_interpreter(model)
    runner = interpreter.get_signature_runner()
    scale, zero = quantization["input_scale"], quantization["input_zero_point"]
    q = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
    out = next(iter(runner(x=q).values()))
    return float(np.mean(np.argmax(out, axis=1) == y))
