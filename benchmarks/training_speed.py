"""Row 4: local training speed, the TFLite `train` signature (Trainer.train_epochs) vs TensorFlow.

The TensorFlow side is the very module fedlite converts (`model_export.trainable.TrainableModel`, whose
`train` is a `tf.function`: forward, GradientTape, assign_sub), started from the same weights and fed the same
shuffled batches. Both use one thread (LiteRT `num_threads=1`; TF intra/inter-op parallelism 1). Runs in a
child process so TensorFlow loads nowhere else. Each repeat trains epoch after epoch for at least
`MIN_SECONDS` (one epoch of a small model takes milliseconds: timing it alone measures the scheduler); the
min/median/max rate over repeats is reported with the CPU seconds per 1,000 samples beside it. The two trainers
alternate repeat by repeat, so a change in load hits both.

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
MIN_SECONDS = 1.0  # per repeat


def sustained(epoch: Any, samples: int) -> tuple[float, float]:
    """(samples/s wall, CPU seconds per 1,000 samples) of `epoch(i)` called until MIN_SECONDS have passed."""
    began, cpu, done = time.perf_counter(), time.process_time(), 0
    while (elapsed := time.perf_counter() - began) < MIN_SECONDS or done == 0:
        epoch(done)
        done += 1
    return samples * done / elapsed, 1000 * (time.process_time() - cpu) / (samples * done)


def tflite_epochs(model_dir: Path, x: np.ndarray, y: np.ndarray) -> tuple[Any, np.ndarray]:
    """(one epoch of Trainer.train_epochs as a function of the epoch index, the initial flat weights)."""
    from fedlite.runtime.trainer import Trainer

    trainer = Trainer.from_dir(model_dir, num_threads=1)
    start = trainer.get_weights()
    trainer.train_epochs(x[:BATCH], y[:BATCH], 1, BATCH, 0.05)  # warm-up

    def epoch(i: int) -> None:
        if i == 0:
            trainer.set_weights(start)
        trainer.train_epochs(x, y, 1, BATCH, 0.05, rng=np.random.default_rng(i))
    return epoch, start


def tf_epochs(model: str, start: np.ndarray, x: np.ndarray, y: np.ndarray) -> Any:
    """One epoch of the same model's `train` tf.function over the same batches, as a function of its index."""
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

    def epoch(i: int) -> None:
        order = np.random.default_rng(i).permutation(len(xs))
        for at in range(0, len(xs), BATCH):
            batch = order[at:at + BATCH]
            module.train(tf.constant(xs[batch]), tf.constant(ys[batch]), lr, mu)
    return epoch


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": median(values), "max": max(values)}


def child(model: str, cache: Path, samples: int, repeats: int) -> dict[str, Any]:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x, y, _, _ = digits_split()
    reps = -(-samples // len(x))
    x, y = np.concatenate([x] * reps)[:samples], np.concatenate([y] * reps)[:samples]
    tflite, start = tflite_epochs(cache / model, x, y)
    tf_epoch = tf_epochs(model, start, x, y)
    runs: dict[str, list[tuple[float, float]]] = {"tflite": [], "tf": []}
    for _ in range(repeats):
        runs["tflite"].append(sustained(tflite, len(x)))
        runs["tf"].append(sustained(tf_epoch, len(x)))
    rate = {k: spread([r for r, _ in v]) for k, v in runs.items()}
    cpu = {k: median([c for _, c in v]) for k, v in runs.items()}
    return {"model": model, "params": int(start.size), "batch": BATCH, "samples": samples, "repeats": repeats,
            "min_seconds_per_repeat": MIN_SECONDS, "tflite_samples_per_s": rate["tflite"]["median"],
            "tf_samples_per_s": rate["tf"]["median"], "tflite_rate": rate["tflite"], "tf_rate": rate["tf"],
            "tflite_cpu_s_per_1k": cpu["tflite"], "tf_cpu_s_per_1k": cpu["tf"],
            "ratio": rate["tflite"]["median"] / rate["tf"]["median"]}


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
