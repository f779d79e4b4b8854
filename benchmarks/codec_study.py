"""Codec study: bytes up and down, accuracy, rounds to target and encode/decode time of every codec, both demo tasks.

In-process federated rounds, no broker, in the demo's setting: 10 devices with a Dirichlet(0.5) label skew (the
demo's partition), 6 of the available devices selected per round (the demo's 60 %), four devices unavailable in
half of the rounds (the demo's two busy ones, the one on battery and the metered one) and one gone for two rounds
a third of the way in (the vanishing one); local training through the real TFLite `Trainer` (2 epochs, the
task's batch size and learning rate). Every update goes through the real encoder (ternary-ef with the device's
persisted error-feedback residual, kept while it sits rounds out), `validate_update` and the mean aggregator;
every round's weights go down through the aggregator's `Downlink` and the device's `fetch`, so bytes down are the
frames each selected device received (full float32 weights, or the delta chain since the round it last held).

A variant is an uplink codec and a downlink (full weights, or deltas in a codec). `float32` sends float32
deltas averaged exactly: the accuracy reference. Seeds pair the variants (same partition, availability,
selection and shuffles); accuracy is the mean over the last 5 rounds (single rounds swing with who took part).

Encode time and the aggregator's decode-and-check time, and the bytes per update against Flower's reply, are
measured on the 100k-parameter model (`mlp100k`) from one real trained update, each repeated until it has run
at least 1 s, five times (min/median/max).

    python benchmarks/codec_study.py [--rounds 30] [--seeds 5] [--tasks digits,health]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import emit, export_in_child, flower_version

CLIENTS, PER_ROUND, ALPHA, EPOCHS = 10, 6, 0.5, 2
FLAKY = (1, 3, 5, 7)  # unavailable in half of the rounds, as the demo's busy, battery and metered devices
VANISHING = 9  # gone for two rounds from a third of the run
LAST = 5  # accuracy: the mean of the last rounds
STEADY_AFTER = 3  # downlink in steady state: after the first rounds, in which every device downloads in full
TARGETS = {"digits": 0.90, "health": 0.95}
MAX_GAP_POINTS = 0.5
FED, RUN, HASH = "bench", "run-bench", "ab" * 32
UPLINK_CODECS = ("int8", "int8-tensor", "int4", "ternary-ef")
VARIANTS: tuple[tuple[str, str], ...] = (
    ("float32", "full"), *((codec, "full") for codec in UPLINK_CODECS),
    ("int8", "int8"), ("int8", "int4"), ("int8", "ternary-ef"), ("int4", "int4"), ("int4", "ternary-ef"),
    ("ternary-ef", "int8"), ("ternary-ef", "int4"), ("ternary-ef", "ternary-ef"),
)


def available(seed: int, number: int, rounds: int) -> list[int]:
    """The devices that can take part in round `number` (the demo's unavailability)."""
    rng = np.random.default_rng((seed, number, 7))
    gone = rounds // 3 <= number < rounds // 3 + 2
    return [c for c in range(CLIENTS) if not (c in FLAKY and rng.random() < 0.5) and not (c == VANISHING and gone)]


def selected(seed: int, number: int, rounds: int) -> list[int]:
    pool = available(seed, number, rounds)
    rng = np.random.default_rng((seed, number, 11))
    return sorted(int(c) for c in rng.choice(pool, size=min(PER_ROUND, len(pool)), replace=False))


class Device:
    """One simulated device: its shard, the weights it holds and its error-feedback residual (both on disk)."""

    def __init__(self, index: int, part: np.ndarray, state: Path) -> None:
        from fedlite.agent.downlink import HeldWeights
        from fedlite.agent.residual import ResidualStore

        self.id, self.part = f"dev-{index:02d}", part
        self.held = HeldWeights(state / f"{self.id}-weights.npz")
        self.residuals = ResidualStore(state / f"{self.id}-residual.npz")

    def encode(self, delta: dict[str, np.ndarray], number: int, encoding: str) -> bytes:
        from fedlite.agent.residual import ResidualKey
        from fedlite.protocol import codecs
        from fedlite.protocol.codec import Header, encode_update_with_residual, encode_weights

        header = Header(kind="update", federation=FED, round=number, model_hash=HASH, client_id=self.id,
                        num_examples=len(self.part), run=RUN, metrics={"train_loss": 0.5, "steps": 10.0})
        if encoding == "float32":
            return encode_weights(delta, header, dtype="float32")
        key = ResidualKey(RUN, HASH, encoding, number)
        residual = self.residuals.load(key) if codecs.get(encoding).residual else None
        payload, left = encode_update_with_residual(delta, header, encoding=encoding, residual=residual)
        self.residuals.stage(key, left)
        self.residuals.commit()
        return payload


def server_mean(updates: list[tuple[str, bytes]], number: int, encoding: str, manifest: dict[str, Any],
                counts: dict[str, int]) -> np.ndarray:
    """The example-weighted mean delta (flat): exact for float32, else through validation and the aggregator."""
    from fedlite.aggregator.strategies import make_aggregator
    from fedlite.aggregator.validation import RoundContext, validate_update
    from fedlite.protocol.codec import decode
    from fedlite.protocol.layout import flatten, weight_specs

    if encoding == "float32":
        total = sum(counts[c] for c, _ in updates)
        return sum(flatten(decode(p).tensors, manifest).astype(np.float64) * counts[c] for c, p in updates) / total
    ctx = RoundContext(FED, number, HASH, manifest, frozenset(c for c, _ in updates), run=RUN, encoding=encoding)
    agg = make_aggregator("mean", weight_specs(manifest), sum_dtype="float32")
    for client, payload in updates:
        valid = validate_update(payload, client, ctx)
        agg.add(valid.delta, valid.num_examples)
    return flatten(agg.result(), manifest)


def run_variant(task: Any, model_dir: Path, uplink: str, downlink: str, rounds: int, seed: int) -> dict[str, Any]:
    """One federated run: the accuracy after each round and every update's and download's bytes."""
    from fedlite.agent.downlink import fetch
    from fedlite.aggregator.downlink import Downlink
    from fedlite.aggregator.retained import RetainedTopics
    from fedlite.demo.partition import dirichlet
    from fedlite.demo.retained_store import RetainedStore
    from fedlite.protocol.layout import num_params, unflatten
    from fedlite.protocol.messages import RoundAnnouncement
    from fedlite.protocol.selection import nobody
    from fedlite.runtime.trainer import Trainer, local_update

    trainer = Trainer.from_dir(model_dir)
    manifest = trainer.manifest
    weights = trainer.get_weights()
    broker, retained = RetainedStore(), RetainedTopics(None, None)
    retained.attach(broker)
    server = Downlink(FED, HASH, manifest, retained, lambda: RUN,
                      delta_encoding="none" if downlink == "full" else downlink)
    parts = dirichlet(task.y_train, CLIENTS, ALPHA, rng=seed)
    accuracy, up, down, how = [trainer.evaluate(task.x_test, task.y_test)[1]], [], [], []
    with tempfile.TemporaryDirectory() as state:
        devices = [Device(i, part, Path(state)) for i, part in enumerate(parts)]
        for number in range(1, rounds + 1):
            sent = server.publish(number, unflatten(weights, manifest))
            a = RoundAnnouncement(federation=FED, round=number, model_hash=HASH, model_topic="",
                                  weights_topic=sent.topic, selection=nobody(), deadline=1e12, run=RUN,
                                  weights_digest=sent.digest, delta_base=sent.delta_base)
            updates, counts = [], {}
            for index in selected(seed, number, rounds):
                device = devices[index]
                got = fetch(a, manifest, device.held, broker.receive, lambda reason: None)
                down.append((number, got.bytes))
                how.append(got.how)
                delta, result = local_update(trainer, got.flat, task.x_train[device.part], task.y_train[device.part],
                                             EPOCHS, task.batch_size, task.lr, rng=np.random.default_rng((seed, number,
                                                                                                          index)))
                payload = device.encode(delta, number, uplink)
                up.append(len(payload))
                updates.append((device.id, payload))
                counts[device.id] = result.num_examples
            weights = (weights + server_mean(updates, number, uplink, manifest, counts)).astype(np.float32)
            server.withdraw(number)
            trainer.set_weights(weights)
            accuracy.append(trainer.evaluate(task.x_test, task.y_test)[1])
    return {"accuracy": accuracy, "bytes_up": up, "bytes_down": down, "how": how,
            "float32_weights": 4 * num_params(manifest)}


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((r for r, acc in enumerate(curve) if acc >= target), None)


def spread(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "se": std / len(values) ** 0.5, "min": min(values),
            "max": max(values)}


def study(task_name: str, cache: Path, rounds: int, seeds: int) -> dict[str, Any]:
    """Every variant on one task over `seeds` paired seeds."""
    from fedlite.demo.datasets import load_task

    task = load_task(task_name)
    model_dir = cache / f"task-{task_name}"
    runs = {variant: [run_variant(task, model_dir, *variant, rounds, seed) for seed in range(seeds)]
            for variant in VARIANTS}
    final = {variant: [float(np.mean(r["accuracy"][-LAST:])) for r in rs] for variant, rs in runs.items()}
    reference = final[("float32", "full")]
    float32_weights = runs[("float32", "full")][0]["float32_weights"]
    rows = []
    for variant, rs in runs.items():
        up = [b for r in rs for b in r["bytes_up"]]
        down = [b for r in rs for _, b in r["bytes_down"]]
        steady = [b for r in rs for number, b in r["bytes_down"] if number > STEADY_AFTER]
        reached = [rounds_to(r["accuracy"], TARGETS[task_name]) for r in rs]
        gaps = [100 * (a - b) for a, b in zip(final[variant], reference, strict=True)]
        rows.append({
            "task": task_name, "uplink": variant[0], "downlink": variant[1], "params": float32_weights // 4,
            "bytes_up_per_update": statistics.fmean(up), "bytes_down_per_device_round": statistics.fmean(down),
            "bytes_down_steady": statistics.fmean(steady), "up_vs_float32": statistics.fmean(up) / float32_weights,
            "down_vs_float32": statistics.fmean(steady) / float32_weights, "accuracy": spread(final[variant]),
            "gap_points": spread(gaps), "rounds_to_target": statistics.median([r for r in reached if r is not None])
            if any(r is not None for r in reached) else None, "reached": sum(r is not None for r in reached),
            "downloads": {h: sum(x == h for r in rs for x in r["how"]) for h in ("full", "delta", "held")},
        })
    return {"task": task_name, "target": TARGETS[task_name], "float32_weights_bytes": float32_weights, "rows": rows}


def timing(cache: Path, repeats: int = 5, minimum: float = 1.0) -> list[dict[str, Any]]:
    """Per codec on the 100k model: bytes per update (and vs Flower's reply), encode and decode-and-check ms."""
    from uplink import client_update, flower_bytes

    from fedlite.aggregator.validation import RoundContext, validate_update
    from fedlite.protocol.codec import Header, encode_update, encode_weights

    export_in_child(["mlp100k"], cache)
    delta, weights, n = client_update(cache / "mlp100k")
    manifest = {"weights": [{"name": k, "shape": list(v.shape)} for k, v in delta.items()]}
    flower = flower_bytes(weights, n)["message"] if flower_version() else None
    rows = []
    for codec in ("float32", *UPLINK_CODECS):
        header = Header(kind="update", federation=FED, round=1, model_hash=HASH, client_id="dev-00", num_examples=n,
                        run=RUN, metrics={"train_loss": 0.5, "steps": 10.0})

        def encode(codec: str = codec, header: Header = header) -> bytes:
            if codec == "float32":
                return encode_weights(delta, header, dtype="float32")
            return encode_update(delta, header, encoding=codec)

        payload = encode()
        ctx = RoundContext(FED, 1, HASH, manifest, frozenset({"dev-00"}), run=RUN, encoding=codec)
        row: dict[str, Any] = {"codec": codec, "params": sum(v.size for v in delta.values()), "bytes": len(payload),
                               "vs_flower": len(payload) / flower if flower else None,
                               "vs_float32": len(payload) / (4 * sum(v.size for v in delta.values())),
                               "encode_ms": sustained(encode, repeats, minimum)}
        if codec != "float32":
            row["decode_check_ms"] = sustained(lambda p=payload, c=ctx: validate_update(p, "dev-00", c), repeats,
                                               minimum)
        rows.append(row)
    return rows


def sustained(fn: Any, repeats: int, minimum: float) -> dict[str, float]:
    """ms per call (wall min/median/max over `repeats` batches of at least `minimum` s; CPU ms per call)."""
    walls, cpus = [], []
    for _ in range(repeats):
        calls, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < minimum:
            fn()
            calls += 1
        walls.append(1000 * (time.perf_counter() - started) / calls)
        cpus.append(1000 * (time.process_time() - cpu) / calls)
    return {"min": min(walls), "median": statistics.median(walls), "max": max(walls),
            "cpu": statistics.median(cpus)}


def pick(tasks: list[dict[str, Any]], side: str) -> dict[str, Any] | None:
    """The variant with the fewest bytes that loses at most `MAX_GAP_POINTS` to float32 on every task, by its
    mean paired gap less one standard error (5 seeds do not establish a mean at the bound): on the uplink ("up":
    variants with full weights down), the downlink ("down": int8 up), or both ("both": up + down per device)."""
    keys = {"up": ("bytes_up_per_update",), "down": ("bytes_down_steady",),
            "both": ("bytes_up_per_update", "bytes_down_steady")}[side]
    allowed = {"up": lambda r: r["downlink"] == "full", "down": lambda r: r["uplink"] == "int8",
               "both": lambda r: True}[side]
    names = {(r["uplink"], r["downlink"]) for t in tasks for r in t["rows"] if allowed(r)}
    fit = []
    for name in names:
        rows = [r for t in tasks for r in t["rows"] if (r["uplink"], r["downlink"]) == name]
        if all(r["gap_points"]["mean"] - r["gap_points"]["se"] >= -MAX_GAP_POINTS for r in rows):
            fit.append((statistics.fmean(sum(r[k] for k in keys) / (4 * r["params"]) for r in rows), name))
    if not fit:
        return None
    ratio, (uplink, downlink) = min(fit)
    return {"uplink": uplink, "downlink": downlink, "bytes_vs_float32": ratio}


def table(result: dict[str, Any]) -> str:
    lines = ["| task | uplink | downlink | B up / update (× float32) | B down / device-round, steady (× float32) | "
             "accuracy (mean ± std) | vs float32, points ± SE (min, max) | rounds to target | "
             "downloads full/delta/held |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in result["tasks"]:
        for r in task["rows"]:
            a, g, d = r["accuracy"], r["gap_points"], r["downloads"]
            lines.append(
                f"| {r['task']} | {r['uplink']} | {r['downlink']} | {r['bytes_up_per_update']:.0f} "
                f"({r['up_vs_float32']:.3f}×) | {r['bytes_down_steady']:.0f} ({r['down_vs_float32']:.3f}×) | "
                f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f} | {g['mean']:+.2f} ± {g['se']:.2f} "
                f"({g['min']:+.2f}, {g['max']:+.2f}) | "
                f"{r['rounds_to_target']} ({r['reached']}/{result['seeds']}) | {d['full']}/{d['delta']}/{d['held']} |")
    lines += ["", "| codec (mlp100k) | bytes / update | × Flower's reply | × float32 | "
              "encode ms (min/median/max; CPU) | decode + checks ms |", "|---|---|---|---|---|---|"]
    for r in result["timing"]:
        e, d = r["encode_ms"], r.get("decode_check_ms")
        ratio = f"{r['vs_flower']:.4f}×" if r["vs_flower"] else "n/a"
        decoded = f"{d['min']:.2f}/{d['median']:.2f}/{d['max']:.2f}; {d['cpu']:.2f}" if d else "—"
        lines.append(f"| {r['codec']} | {r['bytes']} | {ratio} | {r['vs_float32']:.4f}× | "
                     f"{e['min']:.2f}/{e['median']:.2f}/{e['max']:.2f}; {e['cpu']:.2f} | {decoded} |")
    return "\n".join(lines)


def measure(cache: Path, rounds: int, seeds: int, tasks: list[str], timed: bool = True) -> dict[str, Any]:
    export_in_child([f"task-{t}" for t in tasks], cache)
    studied = [study(t, cache, rounds, seeds) for t in tasks]
    return {"rounds": rounds, "seeds": seeds, "clients": CLIENTS, "per_round": PER_ROUND, "alpha": ALPHA,
            "epochs": EPOCHS, "tasks": studied, "timing": timing(cache) if timed else [],
            "pick_uplink": pick(studied, "up"), "pick_downlink": pick(studied, "down"),
            "pick_both": pick(studied, "both")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--tasks", default="digits,health", help="comma-separated demo tasks ('' : timing only)")
    parser.add_argument("--no-timing", action="store_true", help="skip the encode/decode timing (mlp100k)")
    parser.add_argument("--markdown", action="store_true", help="print the tables instead of JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.cache or Path(tmp), args.rounds, args.seeds, [t for t in args.tasks.split(",") if t],
                         not args.no_timing)
    if args.markdown:
        print(table(result))
        print(f"\npick: uplink {result['pick_uplink']}, downlink {result['pick_downlink']}, "
              f"both {result['pick_both']}")
    else:
        emit(result)


if __name__ == "__main__":
    main()
