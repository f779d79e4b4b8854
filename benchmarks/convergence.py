"""Row 5: convergence on the demo task with float32 updates, fedlite's int8 updates and Flower's FedAvg.

In-process simulation, no broker: digits (sklearn, 75/25 stratified split), the demo's MLP 64-32 exported as a
trainable TFLite model, 10 clients with a Dirichlet(alpha=0.5) label skew, every client in every round, local
SGD through the same `Trainer` (`local_update`) with the same per-(seed, round, client) shuffling in all three
variants. The server step differs only in how updates travel and are averaged:

- float32: the exact example-weighted mean of the float32 deltas (float64 arithmetic);
- int8: each delta through `encode_update` (int8 per channel + zstd) and `validate_update`, averaged by the
  aggregator's `MeanAggregator` with float32 sums (its default), as the real aggregator does;
- Flower: each client's trained float32 weights in a reply `Message` (`ArrayRecord` + `MetricRecord`), averaged
  by `flwr.serverapp.strategy.FedAvg.aggregate_train`.

Test accuracy after every round, averaged over seeds; rounds to the target accuracy; final int8 - float32 gap.

    python benchmarks/convergence.py [--rounds 30] [--seeds 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import digits_split, dirichlet, emit, export_in_child, flower_version

TARGET_ACCURACY = 0.90
MAX_GAP_POINTS = 0.5
CLIENTS, ALPHA, EPOCHS, BATCH, LR = 10, 0.5, 1, 32, 0.1
FEDERATION, MODEL_HASH = "bench", "ab" * 32

Update = tuple[dict[str, np.ndarray], int]  # (delta, num_examples)
ServerStep = Callable[[np.ndarray, list[Update], int], np.ndarray]


def float32_step(global_flat: np.ndarray, updates: list[Update], round_: int, manifest: dict[str, Any]) -> np.ndarray:
    from fedlite.protocol.layout import flatten

    total = sum(n for _, n in updates)
    mean = sum(flatten(d, manifest).astype(np.float64) * n for d, n in updates) / total
    return (global_flat + mean).astype(np.float32)


def int8_step(global_flat: np.ndarray, updates: list[Update], round_: int, manifest: dict[str, Any]) -> np.ndarray:
    from fedlite.aggregator.strategies import make_aggregator
    from fedlite.aggregator.validation import RoundContext, validate_update
    from fedlite.protocol.codec import Header, encode_update
    from fedlite.protocol.layout import flatten, weight_specs

    ids = [f"dev-{i:02d}" for i in range(len(updates))]
    ctx = RoundContext(FEDERATION, round_, MODEL_HASH, manifest, frozenset(ids))
    agg = make_aggregator("mean", weight_specs(manifest), sum_dtype="float32")
    for cid, (delta, n) in zip(ids, updates, strict=True):
        header = Header(kind="update", federation=FEDERATION, round=round_, model_hash=MODEL_HASH, client_id=cid,
                        num_examples=n)
        valid = validate_update(encode_update(delta, header), cid, ctx)
        agg.add(valid.delta, valid.num_examples)
    return global_flat + flatten(agg.result(), manifest)


def flower_step(global_flat: np.ndarray, updates: list[Update], round_: int, manifest: dict[str, Any]) -> np.ndarray:
    from flwr.serverapp.strategy import FedAvg
    from uplink import flower_reply

    from fedlite.protocol.layout import flatten, unflatten

    replies = [flower_reply(unflatten(global_flat + flatten(d, manifest), manifest), n, node_id=i + 1)
               for i, (d, n) in enumerate(updates)]
    arrays, _ = FedAvg().aggregate_train(round_, replies)
    return flatten({name: arrays[name].numpy() for name in arrays}, manifest)


STEPS = {"float32": float32_step, "int8": int8_step, "flower": flower_step}


def run_variant(variant: str, model_dir: Path, rounds: int, seed: int) -> list[float]:
    """Test accuracy after each round (index 0: the initial model)."""
    from fedlite.runtime.trainer import Trainer, local_update

    x, y, x_test, y_test = digits_split()
    parts = dirichlet(y, CLIENTS, ALPHA, np.random.default_rng(seed))
    trainer = Trainer.from_dir(model_dir)
    global_flat = trainer.get_weights()
    step = STEPS[variant]
    accuracy = [trainer.evaluate(x_test, y_test)[1]]
    for r in range(1, rounds + 1):
        updates = []
        for c, part in enumerate(parts):
            rng = np.random.default_rng((seed, r, c))
            delta, result = local_update(trainer, global_flat, x[part], y[part], EPOCHS, BATCH, LR, rng=rng)
            updates.append((delta, result.num_examples))
        global_flat = step(global_flat, updates, r, trainer.manifest)
        trainer.set_weights(global_flat)
        accuracy.append(trainer.evaluate(x_test, y_test)[1])
    return accuracy


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((r for r, acc in enumerate(curve) if acc >= target), None)


def measure(cache: Path, rounds: int, seeds: int) -> dict[str, Any]:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    export_in_child(["mlp"], cache)
    variants = list(STEPS) if flower_version() else ["float32", "int8"]
    curves = {v: np.mean([run_variant(v, cache / "mlp", rounds, s) for s in range(seeds)], axis=0).tolist()
              for v in variants}
    out: dict[str, Any] = {"rounds": rounds, "seeds": seeds, "clients": CLIENTS, "alpha": ALPHA, "epochs": EPOCHS,
                           "batch": BATCH, "lr": LR, "target_accuracy": TARGET_ACCURACY, "curves": curves}
    for v in ("float32", "int8", "flower"):
        curve = curves.get(v)
        out[f"{v}_final"] = curve[-1] if curve else None
        out[f"{v}_rounds_to_target"] = rounds_to(curve, TARGET_ACCURACY) if curve else None
    out["int8_gap_points"] = 100 * (out["int8_final"] - out["float32_final"])
    if out["flower_final"] is not None:
        out["flower_gap_points"] = 100 * (out["flower_final"] - out["float32_final"])
    out["met"] = abs(out["int8_gap_points"]) <= MAX_GAP_POINTS
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-") as tmp:
        emit(measure(args.cache or Path(tmp), args.rounds, args.seeds))


if __name__ == "__main__":
    main()
