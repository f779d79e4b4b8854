"""What a run starts from: the round-0 model, the checkpoint to resume, the test set and the evaluator."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator import keras_model
from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.export import export_round, version_dir
from fedlite.aggregator.state_dir import HISTORY_FILE, load_for_resume
from fedlite.protocol.layout import flatten, unflatten
from fedlite.protocol.transport import BrokerSettings

log = logging.getLogger("fedlite.aggregator")

Weights = dict[str, np.ndarray]


class RunFailed(RuntimeError):
    """The federation cannot go on (e.g. a round stayed below quorum on every attempt)."""


class Evaluator:
    """The global model in the same TFLite interpreter the devices use."""

    def __init__(self, train_bytes: bytes, manifest: dict[str, Any],
                 test_set: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        from fedlite.runtime.trainer import Trainer

        self.trainer = Trainer(train_bytes, manifest)
        self.manifest = manifest
        self.test_set = test_set

    def get_weights(self) -> np.ndarray:
        return self.trainer.get_weights()

    def evaluate(self, weights: Weights) -> dict[str, Any]:
        """Accuracy and loss on the server's test set (None without one)."""
        if self.test_set is None:
            return {"accuracy": None, "loss": None}
        self.trainer.set_weights(flatten(weights, self.manifest))
        loss, accuracy = self.trainer.evaluate(*self.test_set)
        return {"accuracy": float(accuracy), "loss": float(loss)}


def initial_model(config: AggregatorConfig, models_dir: Path,
                  representative: np.ndarray | None) -> tuple[dict[str, Any], bytes, Weights]:
    """The round-0 export (made once, then reused): manifest, train.tflite bytes, initial weights."""
    folder = version_dir(models_dir, 0)
    if not (folder / "manifest.json").is_file():
        log.info("exporting the initial model to %s", folder)
        export_round(config.model, folder, keras_model.initial_weights(config.model), representative)
    manifest = json.loads((folder / "manifest.json").read_text())
    keras_model.check_same_model(config.model, manifest, folder)
    train_bytes = (folder / "train.tflite").read_bytes()
    return manifest, train_bytes, unflatten(Evaluator(train_bytes, manifest).get_weights(), manifest)


def resume(state_dir: Path, model_hash: str, weights: Weights,
           optimizer: Any) -> tuple[int, Weights, Any, list[dict[str, Any]]]:
    """(rounds done, weights, optimizer state, history): from the last checkpoint, or a fresh start."""
    checkpoints = state_dir / "checkpoints"
    checkpoint = load_for_resume(checkpoints, state_dir / HISTORY_FILE)  # refuses a lost history
    if checkpoint is None:
        return 0, weights, optimizer.init(weights), []
    if checkpoint.meta.get("model_hash") != model_hash:
        raise RunFailed(f"checkpoints in {checkpoints} belong to model {checkpoint.meta.get('model_hash')}, "
                        f"not {model_hash}: use another state_dir")
    log.info("resuming after round %d from %s", checkpoint.round, checkpoints)
    return (checkpoint.round, checkpoint.weights, optimizer.state_from_arrays(checkpoint.optimizer_state),
            list(checkpoint.history))


def load_test_set(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    if not path:
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


def broker_settings(config: AggregatorConfig) -> BrokerSettings:
    """The aggregator's connection; with several aggregators sharing a subscription its session ends with the
    connection, so that the broker never deals updates to a member that is gone (a shared subscription counts
    offline sessions in). A site's lone aggregator keeps its session: what its devices send while it reconnects
    waits for it."""
    b = config.broker
    expiry = {"session_expiry": 0} if config.cluster.member and b.share_group else {}
    return BrokerSettings(host=b.host, port=b.port, username=b.username, password=b.resolve_password(),
                          tls=b.tls, ca_file=b.ca_file or None, **expiry)


def client_id(config: AggregatorConfig) -> str:
    member = config.cluster.member
    return f"fedlite-aggregator-{config.federation.name}" + (f"-{member}" if member else "")
