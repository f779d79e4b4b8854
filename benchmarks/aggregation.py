"""Row 2: one round's aggregation, fedlite's streaming FedAvg vs Flower's FedAvg, wall time and peak memory.

Each measurement runs in a fresh child process. Updates are "delivered" one at a time as fresh byte buffers,
prepared before the measurement (a few distinct random deltas, reused across clients):

- fedlite: each client's payload (int8 + zstd, `encode_update`, read from a file) goes through
  `validate_update` (decode + checks) and `MeanAggregator.add` with float32 sums (the aggregator's default
  `sum_dtype`), then is dropped; `result()` at the end.
- Flower (1.4x): each reply arrives as the objects its SuperNode pushed (an `ArrayRecord` of float32 `.npy`
  arrays plus a `MetricRecord`), is inflated into a `Message` as the ServerApp's grid does
  (`inflate_object_from_contents`) and held, since FedAvg waits for every reply; then
  `flwr.serverapp.strategy.FedAvg.aggregate_train` runs (its `aggregate_arrayrecords` deserializes each array
  with `Array.numpy()` and sums weighted copies). Its time includes inflation and deserialization, as ours
  includes decoding.

Peak memory is the growth of the process's RSS high-water mark (reset via /proc/self/clear_refs) over its RSS
after a warm-up, i.e. what the round needs on top of an idle aggregator.

    python benchmarks/aggregation.py --updates 100 --params 1000000
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from benchlib import current_rss, emit, median, peak_rss, reset_peak_rss, run_child

FEDERATION, ROUND, MODEL_HASH = "bench", 1, "ab" * 32
SYSTEMS = ("fedlite", "flower")
Specs = list[tuple[str, tuple[int, ...]]]


def layout(params: int, layers: int = 4, width: int = 256) -> Specs:
    """A dense stack of `layers` (rows x width) kernels plus biases totalling about `params`."""
    rows = max(1, params // (layers * width))
    specs: Specs = []
    for i in range(layers):
        specs += [(f"dense_{i}/kernel", (rows, width)), (f"dense_{i}/bias", (width,))]
    return specs


def client_ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def random_deltas(specs: Specs, distinct: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in specs} for _ in range(distinct)]


def examples(i: int) -> int:
    return 50 + (i * 37) % 450


class Clock:
    """Wall and CPU time summed over the timed sections only."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def fresh(data: bytes) -> bytes:
    """A new buffer with the same bytes, as a network receive would produce."""
    return memoryview(data).tobytes()


# --- fedlite --------------------------------------------------------------------------------------


def write_payloads(path: Path, deltas: list[dict[str, np.ndarray]], updates: int) -> None:
    """One int8 + zstd frame per client (each names its own client id), length-prefixed in a file."""
    from fedlite.protocol.codec import Header, encode_update

    with open(path, "wb") as f:
        for i, cid in enumerate(client_ids(updates)):
            header = Header(kind="update", federation=FEDERATION, round=ROUND, model_hash=MODEL_HASH, client_id=cid,
                            num_examples=examples(i), metrics={"train_loss": 1.0})
            payload = encode_update(deltas[i % len(deltas)], header)
            f.write(struct.pack("<Q", len(payload)) + payload)


def receive(f: BinaryIO) -> bytes:
    """The next delivery from the payload file: a fresh buffer, as a network receive produces."""
    (size,) = struct.unpack("<Q", f.read(8))
    return f.read(size)


def fedlite_round(path: Path, updates: int, specs: Specs) -> tuple[Clock, float]:
    """(clock, checksum) of decode + validate + accumulate for `updates` deliveries, then the mean."""
    from fedlite.aggregator.strategies import make_aggregator
    from fedlite.aggregator.validation import RoundContext, validate_update
    from fedlite.protocol.codec import Limits

    params = sum(int(np.prod(shape)) for _, shape in specs)
    limits = Limits(max_payload_bytes=4 * params + (1 << 20), max_decoded_bytes=2 * params + (1 << 20))
    ids = client_ids(updates)
    manifest = {"weights": [{"name": name, "shape": list(shape)} for name, shape in specs]}
    ctx = RoundContext(FEDERATION, ROUND, MODEL_HASH, manifest, frozenset(ids))
    agg = make_aggregator("mean", specs, sum_dtype="float32")
    clock = Clock()
    with open(path, "rb") as f:
        for cid in ids:
            payload = receive(f)
            with clock:
                update = validate_update(payload, cid, ctx, limits)
                agg.add(update.delta, update.num_examples)
            del update, payload
    with clock:
        result = agg.result()
    if len(ctx.accepted) != updates:
        raise RuntimeError(f"only {len(ctx.accepted)} of {updates} updates were accepted")
    return clock, float(sum(float(np.sum(v, dtype=np.float64)) for v in result.values()))


# --- Flower ---------------------------------------------------------------------------------------


def flower_wires(deltas: list[dict[str, np.ndarray]]) -> list[tuple[str, dict[str, bytes]]]:
    """(message id, deflated objects) of one Flower train reply per distinct update."""
    from uplink import flower_reply, flower_wire

    out = []
    for i, delta in enumerate(deltas):
        message = flower_reply(delta, examples(i), node_id=i + 1)
        out.append((message.object_id, flower_wire(message)))
    return out


def flower_round(wires: list[tuple[str, dict[str, bytes]]], updates: int) -> tuple[Clock, float]:
    """(clock, checksum): inflate and hold every reply, then FedAvg.aggregate_train."""
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    replies, clock = [], Clock()
    for i in range(updates):
        message_id, objects = wires[i % len(wires)]
        received = {object_id: fresh(content) for object_id, content in objects.items()}
        with clock:
            replies.append(inflate_object_from_contents(message_id, received))
        del received
    with clock:
        arrays, _ = FedAvg().aggregate_train(ROUND, replies)
    return clock, float(sum(float(np.sum(a.numpy(), dtype=np.float64)) for a in arrays.values()))


# --- child ----------------------------------------------------------------------------------------


def child(system: str, params: int, updates: int, distinct: int, seed: int) -> dict[str, Any]:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    specs = layout(params)
    deltas = random_deltas(specs, distinct, seed)
    if system == "fedlite":
        path = Path(tempfile.mkdtemp(prefix="fedlite-bench-")) / "payloads.bin"
        write_payloads(path, deltas, updates)
        del deltas
        fedlite_round(path, 1, specs)  # warm-up: first-use costs stay out of the numbers
        run = lambda: fedlite_round(path, updates, specs)  # noqa: E731
    else:
        wires = flower_wires(deltas)
        del deltas
        flower_round(wires, 1)
        run = lambda: flower_round(wires, updates)  # noqa: E731
    gc.collect()
    masked = 0 if reset_peak_rss() else max(0, peak_rss() - current_rss())
    baseline = current_rss()
    out = run()
    growth = peak_rss() - baseline
    if system == "fedlite":
        shutil.rmtree(path.parent, ignore_errors=True)
    clock, checksum = out
    return {"system": system, "params": sum(int(np.prod(s)) for _, s in specs), "updates": updates,
            "seconds": clock.wall, "cpu_seconds": clock.cpu, "checksum": checksum, "growth_bytes": growth,
            "masked_bytes": masked}


def measure(params: int, updates: int, repeats: int, flower: bool, distinct: int = 4) -> dict[str, Any]:
    """Median over `repeats` fresh children per system, systems alternating within each repeat."""
    systems = SYSTEMS if flower else SYSTEMS[:1]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(repeats):
        for system in systems if r % 2 == 0 else systems[::-1]:
            runs[system].append(run_child(Path(__file__), ["--child", system, "--params", params, "--updates",
                                                           updates, "--distinct", distinct]))
    row: dict[str, Any] = {"params": runs["fedlite"][0]["params"], "updates": updates, "repeats": repeats}
    for system, results in runs.items():
        row[f"{system}_seconds"] = median([r["seconds"] for r in results])
        row[f"{system}_cpu_seconds"] = median([r["cpu_seconds"] for r in results])
        row[f"{system}_peak_bytes"] = median([r["growth_bytes"] for r in results])
        row[f"{system}_runs"] = results
    if flower:
        row["time_ratio"] = row["fedlite_seconds"] / row["flower_seconds"]
        row["cpu_ratio"] = row["fedlite_cpu_seconds"] / row["flower_cpu_seconds"]
        row["memory_ratio"] = row["fedlite_peak_bytes"] / row["flower_peak_bytes"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distinct", type=int, default=4, help="distinct random deltas, reused across clients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(args.child, args.params, args.updates, args.distinct, args.seed))
        return
    from benchlib import flower_version

    emit(measure(args.params, args.updates, args.repeats, flower_version() is not None, args.distinct))


if __name__ == "__main__":
    main()
