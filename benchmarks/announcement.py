"""Round announcement bytes and per-device parse + decide time: a list of selected ids vs the keyed-hash rule."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchlib import emit

from fedlite.protocol import PROTOCOL_VERSION
from fedlite.protocol.messages import RoundAnnouncement, TrainingPlan, from_json, to_json
from fedlite.protocol.selection import choose, is_selected

SEED = "3c" * 16


@dataclass
class ListAnnouncement:
    """The round announcement with the list of selected client ids (the form the selection rule replaced)."""

    federation: str
    round: int
    model_hash: str
    model_topic: str
    weights_topic: str
    selected: list[str]
    deadline: float
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    session: str = ""
    state: str = "open"
    issued_at: float = 0.0
    run: str = ""
    run_started_at: float = 0.0
    epoch: int = 0
    type: str = "round"
    protocol: int = PROTOCOL_VERSION


def payloads(n: int) -> tuple[list[str], bytes, bytes]:
    """The N client ids, the list-form payload and the selection-form payload of one announcement."""
    ids = [f"dev-{i:05d}" for i in range(n)]
    common = {"federation": "wearables", "round": 17, "model_hash": "ab" * 32, "model_topic": "fl/wearables/model/"
              + "ab" * 32, "weights_topic": "fl/wearables/weights/17", "deadline": 1.8e9, "session": "0123456789ab",
              "issued_at": 1.8e9, "run": "cd" * 16, "run_started_at": 1.7e9, "epoch": 3}
    _, selection = choose(ids, n, SEED)
    listed = to_json(ListAnnouncement(selected=ids, **common))
    compact = to_json(RoundAnnouncement(selection=selection, **common))
    return ids, listed, compact


def measure(fn: Callable[[], Any], samples: int, sample_seconds: float) -> dict[str, list[float]]:
    """Per-call wall and CPU seconds of `fn`, one value per sample (each sample runs `fn` in a loop)."""
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < sample_seconds / 4:
        fn()
        calls += 1
    loops = max(1, round(calls * 4))  # about sample_seconds per sample
    wall, cpu = [], []
    for _ in range(samples):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(loops):
            fn()
        wall.append((time.perf_counter() - w0) / loops)
        cpu.append((time.process_time() - c0) / loops)
    return {"wall": wall, "cpu": cpu, "loops": [float(loops)]}


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run(sizes: list[int], samples: int, sample_seconds: float) -> dict[str, Any]:
    load_before = os.getloadavg()
    rows = []
    for n in sizes:
        ids, listed, compact = payloads(n)
        last = ids[-1]
        assert from_json(ListAnnouncement, listed).selected == ids
        assert is_selected(from_json(RoundAnnouncement, compact).selection, last)
        parsed_list, parsed = from_json(ListAnnouncement, listed), from_json(RoundAnnouncement, compact)
        cases: dict[str, tuple[bytes, Callable[[], Any], Callable[[], Any]]] = {
            "list": (listed, lambda p=listed, c=last: c in from_json(ListAnnouncement, p).selected,
                     lambda a=parsed_list, c=last: c in a.selected),
            "selection": (compact, lambda p=compact, c=last: is_selected(from_json(RoundAnnouncement, p).selection, c),
                          lambda a=parsed, c=last: is_selected(a.selection, c)),
        }
        for form, (payload, both, decide) in cases.items():
            t = measure(both, samples, sample_seconds)
            d = measure(decide, samples, sample_seconds)
            rows.append({"selected": n, "form": form, "bytes": len(payload), "fanout_bytes": len(payload) * n,
                         "wall": spread(t["wall"]), "cpu": spread(t["cpu"]), "loops": int(t["loops"][0]),
                         "decide_wall": spread(d["wall"]), "decide_cpu": spread(d["cpu"])})
        t = measure(lambda e=ids, n=n: choose(e, n, SEED), samples, sample_seconds)
        rows.append({"selected": n, "form": "aggregator choose()", "wall": spread(t["wall"]),
                     "cpu": spread(t["cpu"]), "loops": int(t["loops"][0])})
    return {"rows": rows, "samples": samples, "sample_seconds": sample_seconds, "cores": os.cpu_count(),
            "load_before": load_before, "load_after": os.getloadavg()}


def table(result: dict[str, Any]) -> str:
    def us(d: dict[str, float]) -> str:
        return f"{d['min'] * 1e6:,.1f} / {d['median'] * 1e6:,.1f} / {d['max'] * 1e6:,.1f}"

    lines = ["| selected N | form | bytes per device | broker fan-out to N devices | "
             "parse + decide, wall µs (min / median / max) | CPU µs (min / median / max) | of which decide, µs |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        size = f"{r['bytes']:,} B" if "bytes" in r else "—"
        fanout = f"{r['fanout_bytes'] / 1e6:,.2f} MB" if "bytes" in r else "—"
        decide = us(r["decide_wall"]) if "decide_wall" in r else "—"
        lines.append(f"| {r['selected']:,} | {r['form']} | {size} | {fanout} | {us(r['wall'])} | {us(r['cpu'])} "
                     f"| {decide} |")
    lb, la = result["load_before"], result["load_after"]
    lines.append(f"\nLoad average (1, 5, 15 min) before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after {la[0]:.2f} "
                 f"{la[1]:.2f} {la[2]:.2f} on {result['cores']} cores; {result['samples']} samples of "
                 f"about {result['sample_seconds']} s each. The aggregator row times `choose` over N eligible ids.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--sample-seconds", type=float, default=0.2)
    args = parser.parse_args()
    result = run([int(s) for s in args.sizes.split(",")], args.samples, args.sample_seconds)
    print(table(result))
    emit(result)


if __name__ == "__main__":
    main()
