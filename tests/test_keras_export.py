"""Keras models exported with from_keras: the translation against Keras itself, on-device training against the
built-in architectures, unsupported layers and `fedlite export --keras` (real Keras, TensorFlow and TFLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_models import digits_split

from fedlite.model_export import KerasImportError, from_keras
from fedlite.model_export.convert import export_model
from fedlite.model_export.keras_import import translate
from fedlite.protocol.manifest import load_manifest, unflatten
from fedlite.runtime.trainer import Trainer, one_hot

# Keras initialises kernels Glorot-uniform, the built-in architectures He-uniform (a slower start for the former
# at this learning rate): 10 epochs at 0.1 then 3 at 0.02 end both near their plateau instead of mid-climb.
SCHEDULE, BATCH = ((10, 0.1), (3, 0.02)), 32


@pytest.fixture(scope="module")
def keras() -> Any:
    import keras

    return keras


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits_split()


def _flat(model: Any) -> np.ndarray:
    return np.concatenate([w.ravel() for w in model.get_weights()]).astype(np.float32)


def _accuracy_after_training(model_dir: Path, digits: tuple, shape: tuple[int, ...]) -> float:
    x_train, y_train, x_test, y_test = digits
    trainer = Trainer.from_dir(model_dir)
    for seed, (epochs, lr) in enumerate(SCHEDULE):
        result = trainer.train_epochs(x_train.reshape(-1, *shape), y_train, epochs, BATCH, lr,
                                      rng=np.random.default_rng(seed))
        assert not result.aborted
    return trainer.evaluate(x_test.reshape(-1, *shape), y_test)[1]


def _same_as_keras(model: Any, model_dir: Path, x: np.ndarray, keras_gives_logits: bool = False) -> None:
    """The export holds the Keras weights in manifest order and predicts what Keras predicts."""
    manifest = load_manifest(model_dir)
    assert manifest["arch"] == "keras" and manifest["num_params"] == model.count_params()
    trainer = Trainer.from_dir(model_dir)
    np.testing.assert_array_equal(trainer.get_weights(), _flat(model))
    expected = model.predict(x, verbose=0)
    if keras_gives_logits:
        expected = np.exp(expected - expected.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
    assert np.std(expected) > 0.01  # not a constant output: the comparison means something
    np.testing.assert_allclose(trainer.predict(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_keras_models_train_on_device_like_the_builtin_architecture(keras: Any, digits: tuple, tmp_path: Path,
                                                                    kind: str) -> None:
    keras.utils.set_random_seed(0)
    L = keras.layers
    if kind == "mlp":
        shape: tuple[int, ...] = (64,)
        layers = [L.Dense(64, activation="relu"), L.Dropout(0.2), L.Dense(32, activation="relu"),
                  L.Dense(10, activation="softmax")]
        builtin = ("mlp", {"hidden": [64, 32]})
    else:
        shape = (8, 8, 1)
        layers = [L.Conv2D(8, 3, padding="same", activation="relu"), L.MaxPooling2D(2),
                  L.Conv2D(16, 3, padding="same", activation="relu"), L.MaxPooling2D(2), L.Flatten(),
                  L.Dense(32, activation="relu"), L.Dense(10)]
        builtin = ("cnn", {"filters": [8, 16], "hidden": [32]})
    model = keras.Sequential([keras.Input(shape), *layers])
    from_keras(model, tmp_path / "keras")
    _same_as_keras(model, tmp_path / "keras", digits[2][:64].reshape(-1, *shape),
                   keras_gives_logits=kind == "cnn")
    export_model(builtin[0], shape, 10, tmp_path / "builtin", options=builtin[1])

    ours = _accuracy_after_training(tmp_path / "keras", digits, shape)
    reference = _accuracy_after_training(tmp_path / "builtin", digits, shape)
    print(f"digits {kind}, trained on device: Keras export {ours:.3f}, built-in {builtin[0]} {reference:.3f}")
    assert ours >= 0.93 and abs(ours - reference) <= 0.03


def _sink_2d(keras: Any) -> Any:
    L = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="tanh"), L.AveragePooling2D(2),
        L.Conv2D(6, 2, padding="same", activation="sigmoid"), L.MaxPooling2D(2),
        L.Conv2D(5, 3, strides=2, padding="same", activation="swish"), L.GlobalMaxPooling2D(),
        L.Dense(8, activation="elu"), L.LeakyReLU(), L.Dense(6, activation="relu6"), L.ReLU(), L.Dense(3),
        L.Softmax()])


def _sink_1d(keras: Any) -> Any:
    L = keras.layers
    inputs = keras.Input((15, 3))  # functional, odd sizes: 'same' with stride 2, pooling that drops a remainder
    h = L.Conv1D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    h = L.MaxPooling1D(3)(h)
    h = L.Conv1D(4, 3, dilation_rate=2, padding="same", use_bias=False)(h)
    h = L.Activation("leaky_relu")(h)
    h = L.Reshape((2, 4))(L.Flatten()(h))
    h = L.Dense(5, activation="tanh")(h)  # Dense on a 2-D input: on its last axis, as Keras does
    h = L.GlobalAveragePooling1D()(h)
    outputs = L.Dense(3, activation="softmax")(h)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("build", [_sink_2d, _sink_1d], ids=["2d", "1d"])
def test_every_supported_layer_matches_keras_in_inference_and_one_sgd_step(keras: Any, tmp_path: Path,
                                                                           build: Any) -> None:
    keras.utils.set_random_seed(1)
    model = build(keras)
    from_keras(model, tmp_path)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, *model.input_shape[1:])).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 12), 3)
    _same_as_keras(model, tmp_path, x)

    trainer = Trainer.from_dir(tmp_path)
    trainer.train_step(x, y, lr=0.5, mu=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.CategoricalCrossentropy())
    model.train_on_batch(x, y)
    assert np.max(np.abs(trainer.get_weights() - _flat(model))) < 1e-5


def _with(keras: Any, layer: Any, shape: tuple[int, ...]) -> Any:
    return keras.Sequential([keras.Input(shape), layer, keras.layers.Flatten(), keras.layers.Dense(3)])


def test_an_unsupported_layer_or_graph_is_a_one_line_error_naming_it(keras: Any) -> None:
    L = keras.layers
    cases = [
        (_with(keras, L.LSTM(4, name="lstm_a"), (5, 2)), "unsupported Keras layer LSTM (lstm_a); supported: Dense, "),
        (_with(keras, L.BatchNormalization(name="bn"), (6,)), "unsupported Keras layer BatchNormalization (bn); "),
        (_with(keras, L.Conv2D(2, 3, data_format="channels_first", name="cf"), (1, 6, 6)),
         "Conv2D (cf): only data_format"),
        (_with(keras, L.MaxPooling2D(3, strides=1, name="overlap"), (6, 6, 1)), "MaxPooling2D (overlap): strides"),
        (keras.Sequential([keras.Input((4,)), L.Dense(3, activation="softmax"), L.Dense(3)]),
         "softmax is supported only as the last layer's activation"),
    ]
    inputs = keras.Input((4,))
    branches = L.Add(name="merge")([L.Dense(3)(inputs), L.Dense(3)(inputs)])
    cases.append((keras.Model(inputs, branches), "is not a single chain of layers: Add (merge) takes 2 inputs"))

    class Subclassed(keras.Model):
        def call(self, x: Any) -> Any:
            return x

    cases.append((Subclassed(), "Subclassed is not a Keras Sequential or functional model"))
    for model, message in cases:
        with pytest.raises(KerasImportError) as caught:
            translate(model)
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    with pytest.raises(KerasImportError) as caught:
        translate(cases[0][0])
    supported = str(caught.value).split("supported: ")[1].split(", ")
    assert {"Dense", "Conv1D", "Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Activation"} <= set(supported)


def test_cli_exports_a_saved_keras_model_and_refuses_bad_ones_in_one_line(
        keras: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedlite.cli import main

    L = keras.layers
    saved = tmp_path / "model.keras"
    model = keras.Sequential([keras.Input((4, 4, 1)), L.Conv2D(2, 3, padding="same", activation="relu"),
                              L.Flatten(), L.Dense(3, activation="softmax")])
    model.save(saved)
    assert main(["export", "--keras", str(saved), "--out", str(tmp_path / "m")]) == 0
    assert "keras [4, 4, 1] -> 3 classes" in capsys.readouterr().out
    trainer = Trainer.from_dir(tmp_path / "m")
    np.testing.assert_array_equal(trainer.get_weights(), _flat(model))
    manifest = trainer.manifest  # its options re-export the same program with other weights (as an aggregator does)
    again = export_model("keras", (4, 4, 1), 3, tmp_path / "again", options=manifest["options"],
                         weights=unflatten(trainer.get_weights() * 2, manifest))
    assert again["model_hash"] == manifest["model_hash"]
    np.testing.assert_array_equal(Trainer.from_dir(tmp_path / "again").get_weights(), _flat(model) * 2)

    _with(keras, L.LSTM(2, name="seq"), (3, 2)).save(tmp_path / "lstm.keras")
    (tmp_path / "garbage.keras").write_bytes(b"not a zip")
    for args, message in [
        (["--keras", str(tmp_path / "lstm.keras")], "unsupported Keras layer LSTM (seq); supported:"),
        (["--keras", str(tmp_path / "absent.keras")], "no Keras model file at"),
        (["--keras", str(tmp_path / "garbage.keras")], "cannot load the Keras model"),
        (["--keras", str(saved), "--classes", "3"], "--classes cannot be used with --keras"),
        (["--arch", "mlp", "--classes", "3"], "--input-shape is required with --arch or --builder"),
    ]:
        assert main(["export", *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def _aggregator_toml(folder: Path, model: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aggregator.toml"
    path.write_text(f'[federation]\nname = "k"\nstate_dir = "{folder / "state"}"\n\n'
                    f'[model]\nkeras = "{model}"\n{extra}')
    return path


def test_the_aggregator_starts_from_a_keras_model_beside_its_config_with_its_weights(
        keras: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlite.aggregator.bootstrap import initial_model
    from fedlite.aggregator.checkpoint import ResumeRefused
    from fedlite.aggregator.config import load_config

    model = keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(5, activation="relu", name="h"),
                              keras.layers.Dense(3, activation="softmax", name="out")])
    project = tmp_path / "project"
    path = _aggregator_toml(project, "models/m.keras")
    (project / "models").mkdir()
    model.save(project / "models/m.keras")
    monkeypatch.chdir(tmp_path)  # resolved from the configuration's directory, not the working one
    config = load_config(path)
    spec = config.model
    assert (spec.keras, spec.arch, spec.input_shape, spec.classes) == (
        str(project / "models/m.keras"), "keras", [6], 3)
    manifest, _, weights = initial_model(config, tmp_path / "models", None)
    assert manifest["arch"] == "keras" and manifest["options"]["layers"] == spec.options["layers"]
    expected = translate(model)[1]
    assert set(weights) == set(expected)
    for name, value in expected.items():  # the Keras weights, not the seed's initialisation
        np.testing.assert_array_equal(weights[name], value)
    assert initial_model(load_config(path), tmp_path / "models", None)[0] == manifest  # a restart: the same run
    keras.Sequential([keras.Input(shape=(6,)), keras.layers.Dense(4, name="h"),
                      keras.layers.Dense(3, name="out")]).save(project / "models/m.keras")
    with pytest.raises(ResumeRefused, match="is not the model this run started from .* --reset"):
        initial_model(load_config(path), tmp_path / "models", None)


def test_a_missing_or_unsupported_keras_model_is_a_one_line_aggregator_config_error(
        keras: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedlite.cli import main

    lstm = keras.Sequential([keras.Input(shape=(4, 2)), keras.layers.LSTM(3, name="lstm"),
                             keras.layers.Dense(2, name="out")])
    lstm.save(tmp_path / "lstm.keras")
    (tmp_path / "text.keras").write_text("not a model")
    cases = {"nothing.keras": "model.keras: no Keras model file at",
             "lstm.keras": "model.keras: unsupported Keras layer LSTM (lstm)",
             "text.keras": "model.keras: cannot load the Keras model"}
    for name, message in cases.items():
        path = _aggregator_toml(tmp_path / name.split(".")[0], f"../{name}")
        assert main(["aggregator", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    path = _aggregator_toml(tmp_path / "both", "../lstm.keras", 'builder = "x.py:f"\n')
    assert main(["aggregator", "--config", str(path)]) == 2
    assert "keras and builder exclude each other" in capsys.readouterr().err
