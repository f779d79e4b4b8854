"""On-device training through the trainable model's TFLite signatures (numpy + a TFLite runtime only)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.protocol.manifest import HEAD_TRAIN, PLAIN_TRAIN, load_manifest, read_model_file, unflatten
from fedlite.runtime.interpreter import load_interpreter

ShouldContinue = Callable[[], bool]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of local training.

    loss: mean cross-entropy over the examples of the steps that ran (nan if none ran);
    num_examples: size of the local training set; steps: SGD steps run;
    aborted/reason: training stopped early (should_continue returned False, or the loss diverged).
    """

    loss: float
    num_examples: int
    steps: int
    aborted: bool = False
    reason: str | None = None
    examples_seen: int = 0


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got [{y.min()}, {y.max()}]")
    return np.eye(classes, dtype=np.float32)[y]


class TrainStep:
    """A train signature (`train`, or `train_plain` without mu) called directly: inputs resized (and the subgraph's
    tensors allocated) only when the batch's shape changes, instead of at every step as the signature runner does.
    Falls back to the runner where a runtime's runner does not expose its tensors."""

    def __init__(self, runner: Any, scalars: tuple[str, ...] = ("lr", "mu")) -> None:
        self._runner = runner
        self._names = scalars  # the scalar inputs besides x and y, in the order __call__ takes them
        try:
            self._wrapper = runner._interpreter_wrapper
            self._inputs: dict[str, int] = dict(runner._inputs)
            self._loss = dict(runner._outputs)["loss"]
            self._subgraph = runner._subgraph_index
        except (AttributeError, KeyError, TypeError):
            self._wrapper = None
        self._shape: tuple[int, ...] | None = None
        self._scalars: tuple[float, ...] | None = None

    def invalidate(self) -> None:
        """Another signature ran: resize, allocate and set the scalars again at the next step."""
        self._shape = None

    def __call__(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float) -> float:
        values = dict(zip(("lr", "mu"), (lr, mu), strict=True))
        scalars = tuple(values[name] for name in self._names)
        if self._wrapper is None:
            feed = {name: np.array(v, np.float32) for name, v in zip(self._names, scalars, strict=True)}
            return float(self._runner(x=x, y=y, **feed)["loss"])
        wrapper, inputs, subgraph = self._wrapper, self._inputs, self._subgraph
        if x.shape != self._shape:
            scalar = np.array((), dtype=np.int32)
            for name, shape in (("x", x.shape), ("y", y.shape), *((n, ()) for n in self._names)):
                wrapper.ResizeInputTensor(inputs[name], np.array(shape, dtype=np.int32) if shape else scalar, False,
                                          subgraph)
            wrapper.AllocateTensors(subgraph)
            self._shape, self._scalars = x.shape, None
        if self._scalars != scalars:  # the learning rate changes for a short last batch only
            for name, value in zip(self._names, scalars, strict=True):
                wrapper.SetTensor(inputs[name], np.array(value, np.float32), subgraph)
            self._scalars = scalars
        wrapper.SetTensor(inputs["x"], x, subgraph)
        wrapper.SetTensor(inputs["y"], y, subgraph)
        wrapper.Invoke(subgraph)
        return float(wrapper.GetTensor(self._loss, subgraph))


class Trainer:
    """A trainable model in a TFLite interpreter: weights in and out, SGD epochs, evaluation."""

    def __init__(self, model: bytes | str | os.PathLike[str], manifest: Mapping[str, Any], num_threads: int = 1):
        self.manifest = manifest
        self.input_shape = tuple(manifest["input"]["shape"])
        self.classes = int(manifest["classes"])
        self.num_params = int(manifest["num_params"])
        self.interpreter = load_interpreter(model, num_threads=num_threads)
        available = self.interpreter.get_signature_list()
        missing = [s for s in manifest["signatures"] if s not in available]
        if missing:
            raise ValueError(f"model lacks the signatures {missing} its manifest lists")
        self._runners = {name: self.interpreter.get_signature_runner(name) for name in manifest["signatures"]}
        self._steps = {name: TrainStep(self._runners[name], tuple(n for n in manifest["signatures"][name]["inputs"]
                                                                   if n not in ("x", "y")))
                       for name in ("train", PLAIN_TRAIN, HEAD_TRAIN) if name in self._runners}
        self._last: str | None = None

    def _invalidate(self) -> None:
        for step in self._steps.values():
            step.invalidate()

    def train_signature(self, mu: float) -> str:
        """`train_plain` when mu = 0 and the model has it (exported since it exists), else `train`."""
        return PLAIN_TRAIN if mu == 0 and PLAIN_TRAIN in self._steps else "train"

    @property
    def trains_head(self) -> bool:
        """Whether the model can train its head alone (`train_head`; models exported before it cannot)."""
        return HEAD_TRAIN in self._steps

    def _step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float, head: bool = False) -> float:
        name = HEAD_TRAIN if head and self.trains_head else self.train_signature(mu)
        if name != self._last:  # the other train signature ran last
            self._invalidate()
            self._last = name
        return self._steps[name](x, y, lr, mu)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str], num_threads: int = 1) -> Trainer:
        """Load `model_dir/manifest.json` and its train.tflite (checked against the manifest's sha256)."""
        manifest = load_manifest(model_dir)
        return cls(read_model_file(Path(model_dir), manifest, "train"), manifest, num_threads=num_threads)

    # ------------------------------------------------------------ weights

    def get_weights(self) -> np.ndarray:
        self._invalidate()
        return np.array(self._runners["get_weights"]()["weights"], dtype=np.float32, copy=True)

    def set_weights(self, flat: np.ndarray) -> None:
        """Set the weights and the FedProx anchor."""
        flat = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1)
        if flat.size != self.num_params:
            raise ValueError(f"expected {self.num_params} weights, got {flat.size}")
        self._invalidate()
        self._runners["set_weights"](weights=flat)

    # ------------------------------------------------------------ training and evaluation

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, *self.input_shape)

    def train_step(self, x: np.ndarray, y_onehot: np.ndarray, lr: float, mu: float = 0.0) -> float:
        return self._step(self._inputs(x), np.ascontiguousarray(y_onehot, dtype=np.float32), lr, mu)

    def train_epochs(self, x: np.ndarray, y_int: np.ndarray, epochs: int, batch_size: int, lr: float,
                     mu: float = 0.0, rng: np.random.Generator | None = None,
                     should_continue: ShouldContinue | None = None, head: bool = False) -> TrainResult:
        """SGD over shuffled minibatches; `should_continue()` is asked before every batch. Each epoch's shuffle is
        applied once (one gather), so that every batch is a contiguous slice. `head`: the last layer alone
        (`train_head`; the whole model on a model without it)."""
        x, y = self._inputs(x), one_hot(y_int, self.classes)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        if batch_size < 1 or epochs < 0:
            raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {batch_size} and {epochs}")
        rng = rng if rng is not None else np.random.default_rng()
        steps, seen, loss_sum = 0, 0, 0.0

        def result(aborted: bool = False, reason: str | None = None) -> TrainResult:
            loss = loss_sum / seen if seen else math.nan
            return TrainResult(loss, len(x), steps, aborted, reason, seen)

        for _ in range(epochs):
            order = rng.permutation(len(x))
            xs, ys = x[order], y[order]
            for start in range(0, len(x), batch_size):
                if should_continue is not None and not should_continue():
                    return result(True, "stopped: should_continue() returned False")
                xb, yb = xs[start:start + batch_size], ys[start:start + batch_size]
                # a short last batch steps in proportion to its size: a full step on a few examples is noise
                loss = self._step(xb, yb, lr * len(xb) / batch_size, mu, head)
                if not math.isfinite(loss):
                    return result(True, f"loss is not finite ({loss}) at step {steps + 1}")
                steps, seen, loss_sum = steps + 1, seen + len(xb), loss_sum + loss * len(xb)
        return result()

    def evaluate(self, x: np.ndarray, y_int: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over all examples."""
        x, y = self._inputs(x), one_hot(y_int, self.classes)
        self._invalidate()
        loss_sum, hits = 0.0, 0.0
        for start in range(0, len(x), batch_size):
            out = self._runners["evaluate"](x=x[start:start + batch_size], y=y[start:start + batch_size])
            n = len(x[start:start + batch_size])
            loss_sum += float(out["loss"]) * n
            hits += float(out["accuracy"]) * n
        return (loss_sum / len(x), hits / len(x)) if len(x) else (math.nan, math.nan)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities [N, classes]."""
        x = self._inputs(x)
        self._invalidate()
        parts = [np.array(self._runners["infer"](x=x[s:s + batch_size])["probabilities"], copy=True)
                 for s in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.classes), np.float32)


def local_update(trainer: Trainer, global_flat: np.ndarray, x: np.ndarray, y: np.ndarray, epochs: int,
                 batch_size: int, lr: float, mu: float = 0.0, rng: np.random.Generator | None = None,
                 should_continue: ShouldContinue | None = None) -> tuple[dict[str, np.ndarray], TrainResult]:
    """Train from the global weights; return (trained - global as named arrays, TrainResult)."""
    global_flat = np.asarray(global_flat, dtype=np.float32).reshape(-1)
    trainer.set_weights(global_flat)
    result = trainer.train_epochs(x, y, epochs, batch_size, lr, mu, rng, should_continue)
    delta = trainer.get_weights() - global_flat
    return unflatten(delta, trainer.manifest), result
