"""Row 4: local training speed, the TFLite `train` signature (Trainer.train_epochs) vs TensorFlow.

The TensorFlow side is the very module fedlite converts (`model_export.trainable.TrainableModel`, whose
`train` is a `tf.function`: forward, GradientTape, assign_sub), started from the same weights and fed the same
shuffled batches. Both use one thread (LiteRT `num_threads=1`; TF intra/inter-op parallelism 1). Runs in a
child process so TensorFlow loads nowhere else; the median over repeats is reported.

    python benchmarks/training_speed.py [--models cnn,mlp] [--samples 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import BENCH_DIR, MODELS, digits_split, emit, export_in_child, median, run_child

BATCH = 32


def tflite_rate(model_dir: Path, x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    """(samples/s, initial flat weights) of Trainer.train_epochs, one epoch per repeat."""
    from fedlite.runtime.trainer import Trainer

    trainer = Trainer.from_dir(model_dir, num_threads=1)
    start = trainer.get_weights()
    trainer.train_epochs(x[:BATCH], y[:BATCH], 1, BATCH, 0.05)  # warm-up
    rates = []
    for r in range(repeats):
        trainer.set_weights(start)
        began = time.perf_counter()
        trainer.train_epochs(x, y, 1, BATCH, 0.05, rng=np.random.default_rng(r))
        rates.append(len(x) / (time.perf_counter() - began))
    return median(rates), start


def tf_rate(model: str, start: np.ndarray, x: np.ndarray, y: np.ndarray, repeats: int) -> float:
    """samples/s of the same model's `train` tf.function over the same batches."""
    import tensorflow as tf

    from fedlite.model_export.architectures import build
    from fedlite.model_export.trainable import make_module
    from fedlite.protocol.layout import unflatten
    from fedlite.runtime.trainer import one_hot

    arch, shape, options = MODELS[model]
    model_def = build(arch, shape, 10, **options)
    manifest = {"weights": [{"name": n, "shape": list(s)} for n, s in model_def.weights]}
    module = make_module(model_def, unflatten(start, manifest))
    xs, ys = x.reshape(-1, *shape).astype(np.float32), one_hot(y, 10)
    lr, mu = tf.constant(0.05), tf.constant(0.0)
    module.train(tf.constant(xs[:BATCH]), tf.constant(ys[:BATCH]), lr, mu)  # warm-up: traces the function
    rates = []
    for r in range(repeats):
        order = np.random.default_rng(r).permutation(len(xs))
        began = time.perf_counter()
        for i in range(0, len(xs), BATCH):
            batch = order[i:i + BATCH]
            module.train(tf.constant(xs[batch]), tf.constant(ys[batch]), lr, mu)
        rates.append(len(xs) / (time.perf_counter() - began))
    return median(rates)


def child(model: str, cache: Path, samples: int, repeats: int) -> dict[str, Any]:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x, y, _, _ = digits_split()
    reps = -(-samples // len(x))
    x, y = np.concatenate([x] * reps)[:samples], np.concatenate([y] * reps)[:samples]
    tflite, start = tflite_rate(cache / model, x, y, repeats)
    tf_speed = tf_rate(model, start, x, y, repeats)
    return {"model": model, "params": int(start.size), "batch": BATCH, "samples": samples, "tflite_samples_per_s":
            tflite, "tf_samples_per_s": tf_speed, "ratio": tflite / tf_speed}


def measure(models: list[str], cache: Path, samples: int, repeats: int) -> list[dict[str, Any]]:
    export_in_child(models, cache)
    return [run_child(BENCH_DIR / "training_speed.py", ["--child", m, "--cache", cache, "--samples", samples,
                                                        "--repeats", repeats]) for m in models]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(args.child, args.cache, args.samples, args.repeats))
        return
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-") as tmp:
        emit(measure(args.models.split(","), args.cache or Path(tmp), args.samples, args.repeats))


if __name__ == "__main__":
    main()
