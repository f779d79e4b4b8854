"""Export of every built-in architecture: builtins-only ops, manifest, TF/TFLite step equality, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_models import softmax_regression

from fedlite.model_export import architectures
from fedlite.model_export.convert import export_model, resolve, tflite_ops
from fedlite.protocol.manifest import (
    ManifestError,
    compute_model_hash,
    flatten,
    load_manifest,
    read_model_file,
    unflatten,
)
from fedlite.runtime.interpreter import load_interpreter
from fedlite.runtime.trainer import Trainer, one_hot

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CASES = {
    "mlp-64": ("mlp", (64,)),
    "cnn-8x8x1": ("cnn", (8, 8, 1)),
    "cnn-28x28x1": ("cnn", (28, 28, 1)),
    "conv1d-32x3": ("conv1d", (32, 3)),
}
CLASSES = 10


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    models = {}
    for key, (arch, shape) in CASES.items():
        out = tmp_path_factory.mktemp(key)
        models[key] = (out, export_model(arch, shape, CLASSES, out))
    return models


def _batch(shape: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *shape)).astype(np.float32), rng.integers(0, CLASSES, n)


@pytest.mark.parametrize("key", CASES)
def test_ops_are_tflite_builtins(exported: dict, key: str) -> None:
    out, _ = exported[key]
    for name in ("train.tflite", "infer_int8.tflite"):
        ops = tflite_ops(out / name)
        assert ops, f"{name}: no operators found"
        assert {"FULLY_CONNECTED", "BATCH_MATMUL"} & set(ops), ops
        assert not [op for op in ops if op.startswith("CUSTOM") or "Flex" in op], ops
    train_ops = set(tflite_ops(out / "train.tflite"))
    assert {"VAR_HANDLE", "ASSIGN_VARIABLE", "READ_VARIABLE"} <= train_ops
    if key.startswith(("cnn", "conv1d")):
        assert {"GATHER", "REDUCE_MAX"} <= train_ops


@pytest.mark.parametrize("key", CASES)
def test_manifest_is_consistent(exported: dict, key: str) -> None:
    out, returned = exported[key]
    manifest = load_manifest(out)
    assert manifest == returned
    arch, shape = CASES[key]
    assert manifest["format"] == "fedlite-model" and manifest["format_version"] == 1
    assert manifest["arch"] == arch and manifest["input"] == {"shape": list(shape), "dtype": "float32"}
    assert manifest["classes"] == CLASSES
    assert manifest["num_params"] == sum(w["size"] for w in manifest["weights"])
    assert all(w["size"] == math.prod(w["shape"]) for w in manifest["weights"])
    assert set(manifest["signatures"]) == {"train", "train_plain", "train_head", "infer", "evaluate", "get_weights",
                                           "set_weights"}
    assert manifest["signatures"]["get_weights"]["outputs"]["weights"]["shape"] == [manifest["num_params"]]
    assert manifest["model_hash"] == compute_model_hash(manifest)
    for key_, entry in manifest["files"].items():
        data = (out / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest(), key_
    assert manifest["tensorflow_version"] and manifest["exporter_version"]

    flat = np.random.default_rng(1).normal(size=manifest["num_params"]).astype(np.float32)
    named = unflatten(flat, manifest)
    assert [n for n in named] == [w["name"] for w in manifest["weights"]]
    np.testing.assert_array_equal(flatten(named, manifest), flat)


@pytest.mark.parametrize("key", CASES)
def test_tflite_train_step_equals_tensorflow(exported: dict, key: str) -> None:
    from fedlite.model_export.trainable import make_module

    out, manifest = exported[key]
    arch, shape = CASES[key]
    module = make_module(resolve(arch, shape, CLASSES), seed=0)
    trainer = Trainer.from_dir(out)
    np.testing.assert_array_equal(trainer.get_weights(), module.get_weights()["weights"].numpy())
    # Two steps with mu > 0 (the second one has a non-zero FedProx gradient), then one with mu = 0 (train_plain).
    for step, mu in enumerate((0.5, 0.5, 0.0)):
        x, y = _batch(shape, 16, seed=step)
        lite_loss = trainer.train_step(x, one_hot(y, CLASSES), lr=0.05, mu=mu)
        args = (x, one_hot(y, CLASSES), np.float32(0.05))
        tf_loss = float((module.train(*args, np.float32(mu)) if mu else module.train_plain(*args))["loss"])
        assert abs(lite_loss - tf_loss) < 1e-5
    diff = np.max(np.abs(trainer.get_weights() - module.get_weights()["weights"].numpy()))
    print(f"{key}: max |w_tflite - w_tf| after 3 steps = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("key", CASES)
def test_int8_inference_model_has_int8_io(exported: dict, key: str) -> None:
    out, manifest = exported[key]
    entry = manifest["files"]["infer_int8"]
    interpreter = load_interpreter(read_model_file(out, manifest, "infer_int8"))
    (inp,), (outp,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.int8 and outp["dtype"] == np.int8
    assert inp["quantization"] == pytest.approx((entry["input_scale"], entry["input_zero_point"]))
    assert outp["quantization"] == pytest.approx((entry["output_scale"], entry["output_zero_point"]))
    assert entry["bytes"] < manifest["files"]["train"]["bytes"]


@pytest.mark.parametrize("key", CASES)
def test_set_then_get_weights_round_trips_exactly(exported: dict, key: str) -> None:
    out, manifest = exported[key]
    trainer = Trainer.from_dir(out)
    flat = np.random.default_rng(2).normal(size=manifest["num_params"]).astype(np.float32)
    trainer.set_weights(flat)
    np.testing.assert_array_equal(trainer.get_weights(), flat)
    x, _ = _batch(CASES[key][1], 5, seed=3)
    probabilities = trainer.predict(x)
    assert probabilities.shape == (5, CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_given_weights_are_baked_in_and_model_hash_ignores_them(exported: dict, tmp_path: Path) -> None:
    _, base = exported["mlp-64"]
    weights = unflatten(np.random.default_rng(4).normal(size=base["num_params"]), base)
    manifest = export_model("mlp", (64,), CLASSES, tmp_path, weights=weights)
    np.testing.assert_array_equal(Trainer.from_dir(tmp_path).get_weights(), flatten(weights, manifest))
    assert manifest["model_hash"] == base["model_hash"]
    assert manifest["files"]["train"]["sha256"] != base["files"]["train"]["sha256"]
    other = export_model("mlp", (64,), CLASSES, tmp_path / "wider", options={"hidden": [128]})
    assert other["model_hash"] != base["model_hash"]


def test_user_registered_builder_exports(tmp_path: Path) -> None:
    architectures.register_architecture("softmax_regression", softmax_regression)
    assert "softmax_regression" in architectures.available()
    manifest = export_model("softmax_regression", (6, 6), 4, tmp_path)
    assert manifest["num_params"] == 36 * 4 + 4
    assert [w["name"] for w in manifest["weights"]] == ["linear/kernel", "linear/bias"]
    ops = tflite_ops(tmp_path / "train.tflite")
    assert "FULLY_CONNECTED" in ops or "BATCH_MATMUL" in ops
    trainer = Trainer.from_dir(tmp_path)
    x = np.random.default_rng(5).uniform(size=(8, 6, 6)).astype(np.float32)
    result = trainer.train_epochs(x, np.arange(8) % 4, epochs=1, batch_size=4, lr=0.1)
    assert result.steps == 2 and not result.aborted and math.isfinite(result.loss)


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="available: .*mlp"):
        architectures.build("transformer", (8,), 2)


def test_load_manifest_errors(tmp_path: Path, exported: dict) -> None:
    with pytest.raises(ManifestError, match="no model manifest"):
        load_manifest(tmp_path)
    out, manifest = exported["mlp-64"]
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ManifestError, match="format_version 99"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "num_params": 1}))
    with pytest.raises(ManifestError, match="num_params"):
        load_manifest(tmp_path)


def test_cli_exports_with_user_builder_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = subprocess.run([str(ROOT / ".venv/bin/fedlite"), "export", "--builder", "helpers_models:softmax_regression",
                           "--input-shape", "4,4,1", "--classes", "3", "--out", str(out)],
                          cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train.tflite" in proc.stdout and "infer_int8.tflite" in proc.stdout and "51 params" in proc.stdout
    manifest = load_manifest(out)
    assert manifest["arch"] == "helpers_models:softmax_regression" and manifest["num_params"] == 16 * 3 + 3


def test_cli_arch_with_options_and_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedlite.cli import main

    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(6).uniform(size=(32, 12)).astype(np.float32))
    code = main(["export", "--arch", "mlp", "--input-shape", "12", "--classes", "3", "--hidden", "8",
                 "--calibration", str(calibration), "--seed", "7", "--out", str(tmp_path / "m")])
    assert code == 0
    manifest = load_manifest(tmp_path / "m")
    assert manifest["options"] == {"hidden": [8]} and manifest["num_params"] == 12 * 8 + 8 + 8 * 3 + 3
    assert "manifest.json" in capsys.readouterr().out
    calibration_record = manifest["files"]["infer_int8"]["calibration"]
    assert calibration_record["source"] == "given" and calibration_record["samples"] == 32
    assert 0 <= calibration_record["range"][0] < calibration_record["range"][1] <= 1


def test_the_manifest_says_when_int8_calibration_assumed_uniform_inputs(exported: dict) -> None:
    record = exported["mlp-64"][1]["files"]["infer_int8"]["calibration"]
    assert record == {"source": "assumed uniform", "range": [0.0, 1.0], "samples": record["samples"]}


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet", "--input-shape", "8", "--classes", "3"], "unknown architecture 'resnet'; choose from"),
    (["--arch", "mlp", "--input-shape", "8,8,x", "--classes", "3"], "expected positive sizes"),
    (["--arch", "mlp", "--input-shape", "8", "--classes", "0"], "at least 2 classes"),
    (["--arch", "mlp", "--input-shape", "12", "--classes", "3", "--calibration", "WRONG"],
     "calibration inputs have shape [5, 7], the model's input is [12]"),
    (["--arch", "mlp", "--input-shape", "12", "--classes", "3", "--calibration", "MISSING"], "calibration file"),
])
def test_cli_mistakes_are_one_line_errors_before_tensorflow_loads(tmp_path: Path, args: list[str],
                                                                  message: str) -> None:
    import time

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((5, 7), np.float32))
    args = [str(wrong) if a == "WRONG" else str(tmp_path / "absent.npz") if a == "MISSING" else a for a in args]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fedlite.cli", "export", *args, "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]  # one line naming it (argparse prints its usage above)
    assert time.monotonic() - started < 10  # not after loading TensorFlow


def test_importing_the_cli_and_trainer_does_not_import_tensorflow() -> None:
    code = ("import sys, fedlite.model_export.cli, fedlite.model_export, fedlite.runtime.trainer; "
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


@pytest.mark.parametrize("spatial,channels", [((8, 8), 1), ((6, 4), 3), ((12,), 3)])
def test_im2col_convolution_and_pooling_match_tensorflow_ops(spatial: tuple[int, ...], channels: int) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(8)
    x = rng.normal(size=(2, *spatial, channels)).astype(np.float32)
    kernel = rng.normal(size=(*([3] * len(spatial)), channels, 5)).astype(np.float32)
    bias = rng.normal(size=(5,)).astype(np.float32)
    params = {"c/kernel": tf.constant(kernel), "c/bias": tf.constant(bias)}
    ours = architectures._conv(params, "c", tf.constant(x), spatial, 3)
    reference = tf.nn.convolution(x, kernel, padding="SAME") + bias
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
    pooled = architectures._pool2(ours, spatial)
    np.testing.assert_allclose(pooled.numpy(), tf.nn.pool(ours, [2] * len(spatial), "MAX", strides=[2] * len(spatial),
                                                           padding="VALID").numpy())


def test_odd_sized_inputs_skip_pooling() -> None:
    import tensorflow as tf

    model_def = architectures.build("cnn", (7, 6, 2), 3)
    params = {k: tf.constant(v) for k, v in model_def.init(np.random.default_rng(0)).items()}
    assert model_def.forward(params, tf.zeros([4, 7, 6, 2])).shape == (4, 3)
    assert dict(model_def.weights)["dense_0/kernel"] == (7 * 6 * 16, 32)
