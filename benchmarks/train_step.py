"""The device's training loop: `Trainer.train_epochs` with mu = 0 (each epoch shuffled once, contiguous batches,
the `train_plain` tensors set and invoked directly), the same loop on the FedProx `train` signature with mu = 0 (what
a model exported before `train_plain` runs), and the same SGD through the `train` signature runner with a gather
per batch (the loop as it was), side by side in one process on the same model, data and batches.

All three start from the same weights and end with bit-identical weights (checked; `tests/test_trainer.py` asserts
it too). Each repeat trains epoch after epoch for at least 2 s; the loops alternate repeat by repeat, so a change
in load hits all; min / median / max samples/s over the repeats, the CPU seconds per 1,000 samples beside them.

    python benchmarks/train_step.py [--model mlp] [--samples 1024] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import BENCH_DIR, MODELS, digits_split, emit, export_in_child, spread

BATCH = 32
MIN_SECONDS = 2.0


def runner_epoch(trainer: Any, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
    """One epoch through the signature runner, a gather per batch: the reference the direct step must equal."""
    from fedlite.runtime.trainer import one_hot

    runner, labels = trainer._runners["train"], one_hot(y, trainer.classes)
    order = rng.permutation(len(x))
    for start in range(0, len(x), BATCH):
        batch = order[start:start + BATCH]
        runner(x=np.ascontiguousarray(x[batch], np.float32), y=labels[batch],
               lr=np.array(0.05 * len(batch) / BATCH, np.float32), mu=np.array(0.0, np.float32))


def rate(epoch: Any, samples: int) -> tuple[float, float]:
    began, cpu, done = time.perf_counter(), time.process_time(), 0
    while (elapsed := time.perf_counter() - began) < MIN_SECONDS or done == 0:
        epoch(done)
        done += 1
    return samples * done / elapsed, 1e6 * (time.process_time() - cpu) / (samples * done)  # CPU ms per 1k samples


def fedprox_only(model_dir: Path) -> Any:
    """The model's Trainer as a model exported before `train_plain`: its manifest without that signature."""
    from fedlite.protocol.manifest import PLAIN_TRAIN, load_manifest, read_model_file
    from fedlite.runtime.trainer import Trainer

    manifest = load_manifest(model_dir)
    manifest["signatures"] = {k: v for k, v in manifest["signatures"].items() if k != PLAIN_TRAIN}
    trainer = Trainer(read_model_file(model_dir, manifest), manifest, num_threads=1)
    assert trainer.train_signature(0.0) == "train"
    return trainer


def main(argv: list[str] | None = None) -> None:
    from fedlite.protocol.manifest import PLAIN_TRAIN
    from fedlite.runtime.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cache", type=Path, default=BENCH_DIR / ".cache" / "models")
    args = parser.parse_args(argv)
    export_in_child([args.model], args.cache)
    x, y, _, _ = digits_split()
    x, y = np.resize(x, (args.samples, *x.shape[1:])), np.resize(y, args.samples)
    if MODELS[args.model][1] != (64,):
        x = x.reshape(-1, *MODELS[args.model][1])
    direct, runner = (Trainer.from_dir(args.cache / args.model, num_threads=1) for _ in range(2))
    assert direct.train_signature(0.0) == PLAIN_TRAIN
    fedprox = fedprox_only(args.cache / args.model)
    start = direct.get_weights()
    for trainer in (direct, fedprox, runner):
        trainer.set_weights(start)
    for trainer in (direct, fedprox):
        trainer.train_epochs(x, y, 2, BATCH, 0.05, rng=np.random.default_rng(1))
    rng = np.random.default_rng(1)
    for _ in range(2):
        runner_epoch(runner, x, y, rng)
    identical = bool(np.array_equal(direct.get_weights(), runner.get_weights())
                     and np.array_equal(fedprox.get_weights(), runner.get_weights()))
    loops = {
        "direct": lambda i: direct.train_epochs(x, y, 1, BATCH, 0.05, rng=np.random.default_rng(i)),
        "direct_fedprox": lambda i: fedprox.train_epochs(x, y, 1, BATCH, 0.05, rng=np.random.default_rng(i)),
        "runner": lambda i: runner_epoch(runner, x, y, np.random.default_rng(i)),
    }
    loads, results = [os.getloadavg()[0]], {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            results[name].append(rate(loop, len(x)))
        loads.append(os.getloadavg()[0])
    table = {name: {"samples_per_s": spread([r[0] for r in rows], 1), "cpu_ms_per_1k": spread([r[1] for r in rows], 3)}
             for name, rows in results.items()}
    medians = {name: row["samples_per_s"]["median"] for name, row in table.items()}
    ratio, plain_ratio = medians["direct"] / medians["runner"], medians["direct"] / medians["direct_fedprox"]
    for name, row in table.items():
        print(f"{name}: samples/s {row['samples_per_s']}, CPU ms per 1k samples {row['cpu_ms_per_1k']}")
    print(f"direct / runner (medians): {ratio:.2f}x; train_plain / train at mu = 0 (medians): {plain_ratio:.2f}x; "
          f"identical weights after 2 epochs: {identical}; "
          f"load (1 min) {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    emit({"model": args.model, "batch": BATCH, "samples": len(x), "repeats": args.repeats, "identical": identical,
          "ratio": round(ratio, 3), "plain_ratio": round(plain_ratio, 3), "load_1min": spread(loads, 1),
          "cases": table})

if __name__ == "__main__":
    main()
