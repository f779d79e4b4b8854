"""Row 2: one round's aggregation, fedlite's service path vs Flower's FedAvg, wall and CPU time, peak memory.

Each measurement runs in a fresh child process. Updates are "delivered" one at a time as fresh byte buffers
(a few distinct random deltas, reused across clients, each frame naming its own client):

- fedlite: the aggregator's own path. Every payload (int8 + zstd, `encode_update`) is read from a file and
  handed to a pool of worker threads (2, as the service's inbox on 2 cores; `fedlite-1`: one thread), which
  call `RoundAttempt.offer`: admission, decompression, every validation check, the sketch for the KPIs and the
  fold into the worker's partial float32 running sum, all from the int8 codes (`aggregator/deltas.py`); then
  `close()` merges the partials and computes the cosines. `fedlite-proc`: the same work in 2 worker processes
  (payloads sent over a pipe, partial sums returned and merged), to measure threads against processes.
- Flower (1.4x): each reply arrives as the objects its SuperNode pushed (an `ArrayRecord` of float32 `.npy`
  arrays plus a `MetricRecord`), is inflated into a `Message` as the ServerApp's grid does
  (`inflate_object_from_contents`) and held, since FedAvg waits for every reply; then
  `flwr.serverapp.strategy.FedAvg.aggregate_train` runs (its `aggregate_arrayrecords` deserializes each array
  with `Array.numpy()` and sums weighted copies). Its time includes inflation and deserialization, as ours
  includes decoding (and reading the payload file).

Peak memory is the growth of the process's RSS high-water mark (reset via /proc/self/clear_refs) over its RSS
after a warm-up, i.e. what the round needs on top of an idle aggregator.

    python benchmarks/aggregation.py --updates 100 --params 1000000
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from benchlib import current_rss, emit, median, peak_rss, reset_peak_rss, run_child

FEDERATION, ROUND, MODEL_HASH = "bench", 1, "ab" * 32
SYSTEMS = ("fedlite", "fedlite-1", "fedlite-proc", "flower")
WORKERS = 2  # the service's inbox pool on 2 cores
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


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the process-pool variant's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Clock:
    """Wall and CPU time summed over the timed sections only."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += cpu_seconds() - self._cpu


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


def round_attempt(specs: Specs, ids: list[str], aggregator: Any = None) -> Any:
    """An open round attempt as the sync orchestrator builds it: every client selected, the mean reducer with
    its default float32 sums, the KPI sketcher, limits sized to the model."""
    from fedlite.aggregator.kpis import Sketcher
    from fedlite.aggregator.rounds import RoundAttempt
    from fedlite.aggregator.strategies import make_aggregator
    from fedlite.aggregator.validation import RoundContext
    from fedlite.protocol.codec import update_limits

    params = sum(int(np.prod(shape)) for _, shape in specs)
    manifest = {"weights": [{"name": name, "shape": list(shape)} for name, shape in specs]}
    selected = frozenset(ids)
    ctx = RoundContext(FEDERATION, ROUND, MODEL_HASH, manifest, selected)
    return RoundAttempt(number=ROUND, session="bench", selected=selected, deadline=time.time() + 3600,
                        clients_per_round=len(ids), quorum=1, context=ctx,
                        aggregator=aggregator or make_aggregator("mean", specs),
                        limits=update_limits([shape for _, shape in specs]), sketcher=Sketcher(params))


def fedlite_round(path: Path, updates: int, specs: Specs, workers: int) -> tuple[Clock, float]:
    """(clock, checksum) of `updates` deliveries offered by `workers` threads to one round attempt, then close."""
    ids = client_ids(updates)
    attempt = round_attempt(specs, ids)
    deliveries: queue.Queue[tuple[bytes, str] | None] = queue.Queue(maxsize=2 * workers)

    def work() -> None:
        while (item := deliveries.get()) is not None:
            attempt.offer(*item)

    clock = Clock()
    with clock, open(path, "rb") as f:
        threads = [threading.Thread(target=work) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for cid in ids:
            deliveries.put((receive(f), cid))
        for _ in threads:
            deliveries.put(None)
        for thread in threads:
            thread.join()
        outcome = attempt.close()
    if outcome.record.accepted != updates or len(outcome.cosines) != updates:
        raise RuntimeError(f"only {outcome.record.accepted} of {updates} updates were accepted: "
                           f"{outcome.record.rejected}")
    return clock, float(sum(float(np.sum(v, dtype=np.float64)) for v in outcome.aggregate.values()))


def _process_worker(specs: Specs, ids: list[str], inbox: Any, outbox: Any) -> None:
    """A worker process: offers what arrives to its own attempt, then returns its running sum and sketches."""
    attempt = round_attempt(specs, ids)
    while (item := inbox.get()) is not None:
        attempt.offer(*item)
    attempt.aggregate()  # merges the partials into the attempt's aggregator
    outbox.put((attempt.aggregator.state, attempt.sketches, attempt.example_counts))


def fedlite_processes_round(path: Path, updates: int, specs: Specs, workers: int) -> tuple[Clock, float]:
    """(clock, checksum) with `workers` processes in place of threads: payloads go over pipes, partial sums
    come back and are merged as the attempt's partials are."""
    import multiprocessing

    from fedlite.aggregator.kpis import cosine_to_aggregate
    from fedlite.aggregator.strategies import fedavg

    context = multiprocessing.get_context("fork")
    ids = client_ids(updates)
    clock = Clock()
    with clock, open(path, "rb") as f:
        inboxes = [context.Queue(maxsize=2) for _ in range(workers)]
        outbox = context.Queue()
        procs = [context.Process(target=_process_worker, args=(specs, ids, q, outbox)) for q in inboxes]
        for proc in procs:
            proc.start()
        for i, cid in enumerate(ids):
            inboxes[i % workers].put((receive(f), cid))
        for q in inboxes:
            q.put(None)
        parts = [outbox.get() for _ in procs]
        for proc in procs:
            proc.join()
        state = parts[0][0]
        for other, _, _ in parts[1:]:
            state = fedavg.merge(state, other)
        result = fedavg.mean(state)
        cosine_to_aggregate({c: s for p in parts for c, s in p[1].items()},
                            {c: w for p in parts for c, w in p[2].items()})
    if state.count != updates:
        raise RuntimeError(f"only {state.count} of {updates} updates were accepted")
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
    path = None
    if system.startswith("fedlite"):
        path = Path(tempfile.mkdtemp(prefix="fedlite-bench-")) / "payloads.bin"
        write_payloads(path, deltas, updates)
        del deltas
        kind = fedlite_processes_round if system == "fedlite-proc" else fedlite_round
        workers = 1 if system == "fedlite-1" else WORKERS
        kind(path, min(updates, 4), specs, workers)  # warm-up: first-use costs stay out of the numbers
        run = lambda: kind(path, updates, specs, workers)  # noqa: E731
    else:
        wires = flower_wires(deltas)
        del deltas
        flower_round(wires, 1)
        run = lambda: flower_round(wires, updates)  # noqa: E731
    gc.collect()
    masked = 0 if reset_peak_rss() else max(0, peak_rss() - current_rss())
    baseline = current_rss()
    out = run()
    growth = max(0, peak_rss() - baseline)  # the high-water mark can sit below a baseline read after a free
    if path is not None:
        shutil.rmtree(path.parent, ignore_errors=True)
    clock, checksum = out
    return {"system": system, "params": sum(int(np.prod(s)) for _, s in specs), "updates": updates,
            "seconds": clock.wall, "cpu_seconds": clock.cpu, "checksum": checksum, "growth_bytes": growth,
            "masked_bytes": masked}


def measure(params: int, updates: int, repeats: int, flower: bool, distinct: int = 4,
            variants: bool = True) -> dict[str, Any]:
    """Median over `repeats` fresh children per system, systems alternating within each repeat (`variants`: also
    the one-thread and process-pool fedlite paths)."""
    systems = [s for s in SYSTEMS if (flower or s != "flower") and (variants or s in ("fedlite", "flower"))]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for r in range(repeats):
        for system in systems if r % 2 == 0 else systems[::-1]:
            runs[system].append(run_child(Path(__file__), ["--child", system, "--params", params, "--updates",
                                                           updates, "--distinct", distinct]))
    row: dict[str, Any] = {"params": runs["fedlite"][0]["params"], "updates": updates, "repeats": repeats}
    for system, results in runs.items():
        key = system.replace("-", "_")
        seconds = [r["seconds"] for r in results]
        row[f"{key}_seconds"] = median(seconds)
        row[f"{key}_seconds_min_max"] = [min(seconds), max(seconds)]
        row[f"{key}_cpu_seconds"] = median([r["cpu_seconds"] for r in results])
        row[f"{key}_peak_bytes"] = median([r["growth_bytes"] for r in results])
        row[f"{key}_runs"] = results
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
    parser.add_argument("--no-variants", action="store_true", help="only the service path and Flower")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(args.child, args.params, args.updates, args.distinct, args.seed))
        return
    from benchlib import flower_version

    emit(measure(args.params, args.updates, args.repeats, flower_version() is not None, args.distinct,
                 not args.no_variants))


if __name__ == "__main__":
    main()
