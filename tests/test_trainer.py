"""On-device training of the digits MLP through the TFLite `train` signature under ai-edge-litert."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_models import digits_split, int8_accuracy

from fedlite.model_export.convert import export_model
from fedlite.protocol.manifest import PLAIN_TRAIN, SIGNATURE_NAMES, flatten, read_model_file, unflatten
from fedlite.runtime.interpreter import runtime_name
from fedlite.runtime.trainer import Trainer, local_update

EPOCHS, BATCH, LR = 5, 32, 0.1


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits_split()


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp")
    export_model("mlp", (64,), 10, out)
    return out


def _trained(mlp_dir: Path, digits: tuple) -> tuple[Trainer, float, float]:
    x_train, y_train, x_test, y_test = digits
    trainer = Trainer.from_dir(mlp_dir)
    _, before = trainer.evaluate(x_test, y_test)
    result = trainer.train_epochs(x_train, y_train, EPOCHS, BATCH, LR, rng=np.random.default_rng(0))
    assert not result.aborted and result.steps == EPOCHS * -(-len(x_train) // BATCH)
    _, after = trainer.evaluate(x_test, y_test)
    return trainer, before, after


def test_mlp_learns_digits_within_five_epochs(mlp_dir: Path, digits: tuple) -> None:
    assert runtime_name() == "ai-edge-litert"
    trainer, before, after = _trained(mlp_dir, digits)
    print(f"digits MLP under {runtime_name()}: accuracy {before:.3f} -> {after:.3f} after {EPOCHS} epochs")
    assert before <= 0.20
    assert after >= 0.90
    x_test, y_test = digits[2], digits[3]
    predicted = np.argmax(trainer.predict(x_test), axis=1)
    assert np.mean(predicted == y_test) == pytest.approx(after, abs=1e-6)


def test_should_continue_is_asked_before_every_batch(mlp_dir: Path, digits: tuple) -> None:
    x_train, y_train = digits[0], digits[1]
    trainer = Trainer.from_dir(mlp_dir)
    start = trainer.get_weights()
    calls = []

    def should_continue() -> bool:
        calls.append(1)
        return len(calls) <= 3

    result = trainer.train_epochs(x_train, y_train, EPOCHS, BATCH, LR, rng=np.random.default_rng(0),
                                  should_continue=should_continue)
    assert result.aborted and result.reason
    assert result.steps == 3 and result.examples_seen == 3 * BATCH and len(calls) == 4
    assert not np.array_equal(trainer.get_weights(), start)


def test_fedprox_keeps_weights_closer_to_the_anchor(mlp_dir: Path, digits: tuple) -> None:
    x_train, y_train = digits[0], digits[1]
    trainer = Trainer.from_dir(mlp_dir)
    manifest = trainer.manifest
    global_flat = trainer.get_weights()
    distances = {}
    for mu in (0.0, 5.0):
        delta, result = local_update(trainer, global_flat, x_train, y_train, epochs=2, batch_size=BATCH, lr=LR,
                                     mu=mu, rng=np.random.default_rng(1))
        assert not result.aborted and list(delta) == [w["name"] for w in manifest["weights"]]
        assert all(list(delta[w["name"]].shape) == w["shape"] for w in manifest["weights"])
        np.testing.assert_allclose(flatten(delta, manifest), trainer.get_weights() - global_flat, atol=0)
        distances[mu] = float(np.linalg.norm(flatten(delta, manifest)))
    print(f"||trained - global||: mu=0 {distances[0.0]:.3f}, mu=5 {distances[5.0]:.3f}")
    assert distances[5.0] < 0.5 * distances[0.0]


def test_int8_inference_model_matches_float_accuracy(mlp_dir: Path, digits: tuple, tmp_path: Path) -> None:
    x_train, _, x_test, y_test = digits
    trainer, _, float_accuracy = _trained(mlp_dir, digits)
    manifest = export_model("mlp", (64,), 10, tmp_path, weights=unflatten(trainer.get_weights(), trainer.manifest),
                            representative=x_train)
    entry = manifest["files"]["infer_int8"]
    accuracy = int8_accuracy(read_model_file(tmp_path, manifest, "infer_int8"), entry, x_test, y_test)
    print(f"digits MLP: float {float_accuracy:.3f}, int8 {accuracy:.3f} "
          f"({manifest['files']['train']['bytes']} B trainable, {entry['bytes']} B int8)")
    assert abs(accuracy - float_accuracy) <= 0.03


def test_the_direct_train_step_trains_exactly_as_the_signature_runner_does(mlp_dir: Path, digits: tuple) -> None:
    from fedlite.runtime.trainer import one_hot

    x, y = digits[0][:250], digits[1][:250]  # 250: a short last batch, stepped in proportion
    fast, reference = Trainer.from_dir(mlp_dir), Trainer.from_dir(mlp_dir)
    assert fast._steps["train"]._wrapper is not None  # this runtime exposes its tensors: the direct path runs
    start = fast.get_weights()
    fast.set_weights(start)
    result = fast.train_epochs(x, y, 2, 32, 0.1, mu=0.01, rng=np.random.default_rng(3))
    fast.evaluate(x[:50], y[:50])  # another signature in between: the next step resizes again
    fast.train_epochs(x, y, 1, 32, 0.1, mu=0.01, rng=np.random.default_rng(4))

    reference.set_weights(start)
    runner, labels = reference._runners["train"], one_hot(y, 10)
    for seed, epochs in ((3, 2), (4, 1)):
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for s in range(0, len(x), 32):
                batch = order[s:s + 32]
                runner(x=np.ascontiguousarray(x[batch], np.float32), y=labels[batch],
                       lr=np.array(0.1 * len(batch) / 32, np.float32), mu=np.array(0.01, np.float32))
    assert result.steps == 2 * 8 and result.examples_seen == 500
    assert np.array_equal(fast.get_weights(), reference.get_weights())


def test_mu_zero_runs_train_plain_with_the_weights_of_the_fedprox_signature(mlp_dir: Path, digits: tuple) -> None:
    """mu = 0 trains through `train_plain` (no FedProx ops); a model exported before it (only the five
    signatures, a real conversion) falls back to `train`; both end with the same weights, also after mu > 0."""
    from fedlite.model_export.architectures import build
    from fedlite.model_export.convert import convert_trainable
    from fedlite.model_export.trainable import make_module

    x, y = digits[0][:250], digits[1][:250]
    new = Trainer.from_dir(mlp_dir)
    older_manifest = {**new.manifest, "signatures": {k: new.manifest["signatures"][k] for k in SIGNATURE_NAMES}}
    older = Trainer(convert_trainable(make_module(build("mlp", (64,), 10)), SIGNATURE_NAMES), older_manifest)
    assert PLAIN_TRAIN in new.interpreter.get_signature_list()
    assert PLAIN_TRAIN not in older.interpreter.get_signature_list()
    assert (new.train_signature(0.0), new.train_signature(0.5), older.train_signature(0.0)) == \
        (PLAIN_TRAIN, "train", "train")
    start = new.get_weights()
    for trainer in (new, older):
        trainer.set_weights(start)
        for seed, mu in ((5, 0.0), (6, 0.5), (7, 0.0)):  # switching signatures in between
            trainer.train_epochs(x, y, 1, 32, 0.1, mu=mu, rng=np.random.default_rng(seed))
    assert not np.array_equal(new.get_weights(), start)
    np.testing.assert_array_equal(new.get_weights(), older.get_weights())


def test_train_head_moves_the_last_layer_alone_and_personalization_serves_the_better_model(
        mlp_dir: Path, digits: tuple, tmp_path: Path) -> None:
    """`train_head` changes only the output layer's kernel and bias; on a device whose data has 3 of the 10 digits,
    the head fine-tuned from a global model beats it on that device's held-out data, and is the one served."""
    from fedlite.agent.config import PersonalizationSection
    from fedlite.agent.data import LocalData
    from fedlite.agent.personalize import SERVING_FILE, keep, personalize

    x_train, y_train, x_test, y_test = digits
    trainer = Trainer.from_dir(mlp_dir)
    assert trainer.trains_head
    trainer.train_epochs(x_train, y_train, 3, 32, 0.1, rng=np.random.default_rng(0))  # a global model
    global_flat = trainer.get_weights()
    head = sum(int(np.prod(w["shape"])) for w in trainer.manifest["weights"][-2:])
    local = np.isin(y_train, [1, 4, 7])
    held = np.isin(y_test, [1, 4, 7])
    data = LocalData(x_train[local], y_train[local], x_test[held], y_test[held])
    done = personalize(trainer, global_flat, data, PersonalizationSection(enabled=True, epochs=3), 32, 0.1,
                       np.random.default_rng(1), lambda: True, ("run", 5, "hash"))
    assert done is not None
    comparison, personalized = done
    assert np.array_equal(personalized[:-head], global_flat[:-head])  # the body as it was
    assert not np.array_equal(personalized[-head:], global_flat[-head:])
    assert comparison.personalized_accuracy > comparison.global_accuracy, comparison
    assert comparison.serving == "personalized"
    assert keep(tmp_path, comparison, personalized)
    assert json.loads((tmp_path / SERVING_FILE).read_text())["serving"] == "personalized"
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the state dir should be")
    assert not keep(blocked, comparison, personalized)  # a write that fails is logged, not raised
