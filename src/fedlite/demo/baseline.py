"""Centralized baseline: the demo's exported trainable model trained on the pooled training data."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from .datasets import Task


def centralized_accuracy(task: Task, epochs: int, batch_size: int, lr: float, seed: int,
                         model_dir: str | os.PathLike[str], initial_weights: np.ndarray | None = None,
                         num_threads: int = 1) -> dict[str, Any]:
    """Train `model_dir`'s train.tflite on all of the task's training data; evaluate on its test set.

    Starts from the weights in the exported model (the federated run's round-0 weights) unless
    `initial_weights` (flat, manifest order) is given. Returns accuracy, loss, seconds and the steps run.
    """
    from fedlite.runtime.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer.from_dir(model_dir, num_threads=num_threads)
    if initial_weights is not None:
        trainer.set_weights(initial_weights)
    result = trainer.train_epochs(task.x_train, task.y_train, epochs, batch_size, lr, rng=np.random.default_rng(seed))
    loss, accuracy = trainer.evaluate(task.x_test, task.y_test)
    return {"accuracy": float(accuracy), "loss": float(loss), "seconds": round(time.perf_counter() - started, 3),
            "epochs": epochs, "steps": result.steps, "train_loss": float(result.loss), "aborted": result.aborted}
