"""On-device personalization: a copy of the global model fine-tuned on local data (by default its head alone), kept
beside the global one, both evaluated on the held-out split, the better one served (README, "Personalization").
Nothing personalized leaves the device: only the two accuracies, in an evaluation report."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.agent.config import PersonalizationSection
from fedlite.agent.data import LocalData
from fedlite.fsutil import StorageError, write_atomic, write_npz

log = logging.getLogger("fedlite.agent")
WEIGHTS_FILE = "personalized.npz"
SERVING_FILE = "serving.json"


@dataclass(frozen=True)
class Comparison:
    """The global model and its personalized copy on the device's held-out split, and which one it serves."""

    run: str
    round: int
    model_hash: str
    global_accuracy: float
    personalized_accuracy: float
    global_loss: float
    personalized_loss: float
    serving: str  # "personalized" | "global"

    def metrics(self) -> dict[str, float]:
        """The evaluation report's metrics (protocol §9)."""
        return {"global_accuracy": self.global_accuracy, "personalized_accuracy": self.personalized_accuracy,
                "global_loss": self.global_loss, "personalized_loss": self.personalized_loss}


def serves_personalized(personalized: float, global_: float, min_gain: float) -> bool:
    """The rule: the personalized model is served when its held-out accuracy beats the global one's by more than
    `min_gain`; on a tie, or below, the global model (it saw every device's data)."""
    return personalized > global_ + min_gain


def personalize(trainer: Any, global_flat: np.ndarray, data: LocalData, settings: PersonalizationSection,
                batch_size: int, learning_rate: float, rng: np.random.Generator,
                should_continue: Callable[[], bool],
                ident: tuple[str, int, str]) -> tuple[Comparison, np.ndarray] | None:
    """Fine-tune a copy of `global_flat` and compare it with the global model: (the comparison, the personalized
    weights); None without held-out data or when stopped (a gate closed). `ident`: (run, round, model_hash) of the
    global weights."""
    if not len(data.x_holdout) or not len(data.x_train):
        return None
    trainer.set_weights(global_flat)
    global_loss, global_accuracy = trainer.evaluate(data.x_holdout, data.y_holdout)
    result = trainer.train_epochs(data.x_train, data.y_train, settings.epochs, batch_size,
                                  settings.learning_rate or learning_rate, rng=rng, should_continue=should_continue,
                                  head=settings.head_only)
    if result.aborted:
        log.info("personalization stopped: %s", result.reason)
        return None
    loss, accuracy = trainer.evaluate(data.x_holdout, data.y_holdout)
    serving = "personalized" if serves_personalized(accuracy, global_accuracy, settings.min_gain) else "global"
    comparison = Comparison(*ident, float(global_accuracy), float(accuracy), float(global_loss), float(loss), serving)
    return comparison, trainer.get_weights()


def keep(state_dir: Path, comparison: Comparison, personalized: np.ndarray) -> bool:
    """The personalized weights and what is served, in the state dir (an application reads serving.json); False,
    logged, when they cannot be written (the previous ones stay served; training goes on)."""
    try:
        write_npz(state_dir / WEIGHTS_FILE, {"weights": personalized.astype(np.float32)})
        write_atomic(state_dir / SERVING_FILE, json.dumps({**asdict(comparison), "weights_file": WEIGHTS_FILE},
                                                          indent=1).encode())
    except StorageError as exc:
        log.warning("personalized model not saved: %s", exc)
        return False
    return True
