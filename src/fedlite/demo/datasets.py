"""Demo tasks built only from the datasets scikit-learn ships (no downloads): features, labels and a model choice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Task:
    """A classification task: a stratified train/test split, the architecture the demo exports for it,
    and SGD settings (`lr`, `batch_size`) that train it well centrally."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    classes: int
    arch: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    lr: float = 0.1
    batch_size: int = 32

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


@dataclass(frozen=True)
class TaskSpec:
    """How to build a task: a loader of (features, labels), the model, and whether to standardize features."""

    loader: Callable[[], tuple[np.ndarray, np.ndarray]]
    input_shape: tuple[int, ...]
    arch: str
    options: dict[str, Any]
    standardize: bool
    description: str
    lr: float = 0.1
    batch_size: int = 32


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data / 16.0, data.target


def _breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return data.data, data.target


def _wine() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_wine

    data = load_wine()
    return data.data, data.target


TASKS: dict[str, TaskSpec] = {
    "digits": TaskSpec(_digits, (64,), "mlp", {"hidden": [64, 32]}, False,
                       "handwritten digits 0-9 (sklearn load_digits, 1797 8x8 images as 64 features in [0, 1]), "
                       "MLP 64-32"),
    "health": TaskSpec(_breast_cancer, (30,), "mlp", {"hidden": [32, 16]}, True,
                       "health-risk screening: malignant vs benign tumour from 30 cell-nucleus measurements "
                       "(sklearn load_breast_cancer, 569 patients, standardized), MLP 32-16"),
    "wine": TaskSpec(_wine, (13,), "mlp", {"hidden": [16]}, True,
                     "wine cultivar from 13 chemical measurements (sklearn load_wine, 178 samples, 3 classes, "
                     "standardized), MLP 16"),
}


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both splits with the training split's mean and standard deviation."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_test - mean) / std


def load_task(name: str, seed: int = 0, test_fraction: float = TEST_FRACTION) -> Task:
    """The task `name` with a stratified train/test split drawn with `seed`."""
    from sklearn.model_selection import train_test_split

    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    x, y = spec.loader()
    x_train, x_test, y_train, y_test = train_test_split(np.asarray(x, np.float64), np.asarray(y),
                                                        test_size=test_fraction, stratify=y, random_state=seed)
    if spec.standardize:
        x_train, x_test = _standardize(x_train, x_test)
    shape = spec.input_shape
    return Task(name=name,
                x_train=x_train.astype(np.float32).reshape(-1, *shape), y_train=y_train.astype(np.int64),
                x_test=x_test.astype(np.float32).reshape(-1, *shape), y_test=y_test.astype(np.int64),
                input_shape=shape, classes=int(np.max(y)) + 1, arch=spec.arch, options=dict(spec.options),
                description=spec.description, lr=spec.lr, batch_size=spec.batch_size)


def describe_tasks() -> str:
    """One line per registered task, for --help texts."""
    return "\n".join(f"  {name:8s} {spec.description}" for name, spec in TASKS.items())
