"""The trainable tf.Module whose signatures are the device protocol of a fedlite model.

Signatures (batch axis dynamic, all tensors float32 unless noted; `P` = num_params, `C` = classes):

    train(x [N, *input_shape], y [N, C] one-hot, lr [], mu []) -> {"loss": []}
        One SGD step on mean softmax cross-entropy + mu/2 * sum ||w - anchor||^2 (FedProx);
        the returned loss is the cross-entropy part, computed before the step.
    train_plain(x, y, lr) -> {"loss": []}
        The same step without the FedProx term (no anchor ops in its graph): what a device runs when mu = 0.
    train_head(x, y, lr) -> {"loss": []}
        `train_plain` on the head alone (the last layer: the last two weights in manifest order, or the last one
        if it is not a bias); every other weight stays as it is. What on-device personalization runs.
    infer(x [N, *input_shape]) -> {"logits": [N, C], "probabilities": [N, C]}
    evaluate(x [N, *input_shape], y [N, C] one-hot) -> {"loss": [], "accuracy": []}   (batch means)
    get_weights() -> {"weights": [P]}          all weights flattened in manifest order, concatenated
    set_weights(weights [P]) -> {"num_params": [] int32}   assigns the weights and the FedProx anchors

Each weight is one tf.Variable; a second, non-trainable variable per weight holds the anchor
(the global weights of the round) for the FedProx term. `fedlite.model_export.manifest.signature_specs`
describes the same interface in the manifest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fedlite.protocol.manifest import EXPORTED_SIGNATURES, HEAD_TRAIN, PLAIN_TRAIN

from .architectures import ModelDef


def _variable_name(name: str) -> str:
    return name.replace("/", "__")


class TrainableModel(tf.Module):
    """Variables, anchors and the five protocol signatures of one ModelDef."""

    def __init__(self, model_def: ModelDef, initial: Mapping[str, np.ndarray]):
        super().__init__(name="fedlite_model")
        self.model_def = model_def
        self.names = [name for name, _ in model_def.weights]
        self.shapes = [shape for _, shape in model_def.weights]
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.num_params = sum(self.sizes)
        self.vars = [tf.Variable(np.asarray(initial[n], np.float32), name=_variable_name(n)) for n in self.names]
        self.anchors = [tf.Variable(np.asarray(initial[n], np.float32), name=_variable_name(n) + "__anchor",
                                    trainable=False) for n in self.names]
        x = tf.TensorSpec([None, *model_def.input_shape], tf.float32, name="x")
        y = tf.TensorSpec([None, model_def.classes], tf.float32, name="y")
        flat = tf.TensorSpec([self.num_params], tf.float32, name="weights")
        lr = tf.TensorSpec([], tf.float32, name="lr")
        self.train = tf.function(self._train, input_signature=[x, y, lr, tf.TensorSpec([], tf.float32, name="mu")])
        setattr(self, PLAIN_TRAIN, tf.function(self._train_plain, input_signature=[x, y, lr]))
        setattr(self, HEAD_TRAIN, tf.function(self._train_head, input_signature=[x, y, lr]))
        self.infer = tf.function(self._infer, input_signature=[x])
        self.evaluate = tf.function(self._evaluate, input_signature=[x, y])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(self._set_weights, input_signature=[flat])

    def _params(self) -> dict[str, tf.Variable]:
        return dict(zip(self.names, self.vars, strict=True))

    def _cross_entropy(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = self.model_def.forward(self._params(), x)
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits))
        return loss, logits

    def _train(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, mu: tf.Tensor) -> dict[str, tf.Tensor]:
        def proximal(loss: tf.Tensor) -> tf.Tensor:
            prox = tf.add_n([tf.reduce_sum(tf.square(w - a)) for w, a in zip(self.vars, self.anchors, strict=True)])
            return loss + 0.5 * mu * prox

        return self._sgd_step(x, y, lr, proximal)

    def _train_plain(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._sgd_step(x, y, lr, lambda loss: loss)

    def _train_head(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor) -> dict[str, tf.Tensor]:
        return self._sgd_step(x, y, lr, lambda loss: loss, self.vars[-head_size(self.shapes):])

    def _sgd_step(self, x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, objective: Callable[[tf.Tensor], tf.Tensor],
                  trained: Sequence[tf.Variable] | None = None) -> dict[str, tf.Tensor]:
        """One SGD step on `objective(cross-entropy)` for the `trained` variables (all by default); returns the
        cross-entropy before the step."""
        trained = list(self.vars if trained is None else trained)
        with tf.GradientTape() as tape:
            loss, _ = self._cross_entropy(x, y)
            total = objective(loss)
        grads = tape.gradient(total, trained)
        for var, grad in zip(trained, grads, strict=True):
            var.assign_sub(lr * grad)
        return {"loss": loss}

    def _infer(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = self.model_def.forward(self._params(), x)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def _evaluate(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        loss, logits = self._cross_entropy(x, y)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=1), tf.argmax(y, axis=1)), tf.float32)
        return {"loss": loss, "accuracy": tf.reduce_mean(hits)}

    def _get_weights(self) -> dict[str, tf.Tensor]:
        return {"weights": tf.concat([tf.reshape(v, [-1]) for v in self.vars], axis=0)}

    def _set_weights(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        offset = 0
        for var, anchor, shape, size in zip(self.vars, self.anchors, self.shapes, self.sizes, strict=True):
            value = tf.reshape(weights[offset:offset + size], shape)
            var.assign(value)
            anchor.assign(value)
            offset += size
        return {"num_params": tf.size(weights)}

    def signatures(self, names: Sequence[str] = EXPORTED_SIGNATURES) -> dict[str, Any]:
        """The concrete functions of `names`, by name."""
        return {name: getattr(self, name).get_concrete_function() for name in names}


def head_size(shapes: Sequence[Sequence[int]]) -> int:
    """How many of the last weights are the head: the output layer's kernel and bias (2), or its kernel alone."""
    return 2 if len(shapes) >= 2 and len(shapes[-1]) == 1 and len(shapes[-2]) >= 2 else 1


def initial_weights(model_def: ModelDef, weights: Mapping[str, np.ndarray] | None, seed: int) -> dict[str, np.ndarray]:
    """`weights` checked against the layout, or the deterministic initialisation for `seed`."""
    if weights is None:
        return model_def.init(np.random.default_rng(seed))
    expected = dict(model_def.weights)
    if set(weights) != set(expected):
        missing, extra = set(expected) - set(weights), set(weights) - set(expected)
        raise ValueError(f"weights do not match the layout (missing {sorted(missing)}, extra {sorted(extra)})")
    for name, shape in expected.items():
        if tuple(np.shape(weights[name])) != tuple(shape):
            raise ValueError(f"weight {name!r} has shape {np.shape(weights[name])}, expected {shape}")
    return {name: np.asarray(weights[name], np.float32) for name in expected}


def make_module(model_def: ModelDef, weights: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> TrainableModel:
    return TrainableModel(model_def, initial_weights(model_def, weights, seed))
