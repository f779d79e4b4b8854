"""Updates per second and CPU seconds per update with 1, 2 and 4 aggregators on one federation (`--aggregators`).

Each case is `fedlite simulate --clients N --rounds R --aggregators A --json` (the lean virtual fleet, real
Mosquitto, every aggregator a process: the first coordinates, the others are members of the `$share` group that
claim, check and fold their share and hand over a partial sum). Round 1 (connections, model download, warm-up)
is left out. Per case: the median steady round's wall seconds, updates per second (K / round seconds), and the
CPU seconds all aggregator processes spent per update, with each member's share of updates and CPU. Cases
alternate within each repeat; min / median / max over the repeats are printed, with the machine's load. On a
2-core machine the fleet, the broker and the aggregators share the cores: the wall time cannot scale there,
the CPU seconds per update show what one more aggregator costs or saves.

    python benchmarks/aggregator_scaling.py [--counts 1,2,4] [--clients 1000] [--rounds 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchlib import emit, median, simulate, spread


def steady(result: dict[str, Any]) -> dict[str, Any]:
    """One run's steady rounds (the first left out): round seconds, updates/s, aggregator CPU per update."""
    seconds = result["round_seconds"][1:]
    per_round = result["clients_per_round"]
    cpu = result["cpu_seconds_per_round"]["aggregator"][1:]
    shares = {name: sum(values[1:]) for name, values in result["updates_per_round_by_aggregator"].items()}
    member_cpu = {name: sum(values[1:]) for name, values in result["cpu_seconds_per_round_by_aggregator"].items()}
    return {
        "round_seconds": median(seconds),
        "updates_per_second": per_round / median(seconds),
        "aggregator_cpu_ms_per_update": 1000 * sum(cpu) / (per_round * len(cpu)),
        "updates_by_aggregator": shares,
        "cpu_ms_per_update_by_aggregator": {n: round(1000 * member_cpu[n] / shares[n], 3) if shares[n] else None
                                            for n in shares},
        "broker_cpu_seconds_per_round": median(result["cpu_seconds_per_round"]["broker"][1:]),
        "fleet_cpu_seconds_per_round": median(result["cpu_seconds_per_round"]["fleet"][1:]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("aggregator_scaling.json"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in counts}
    loads = [os.getloadavg()[0]]
    for repeat in range(args.repeats):
        for count in counts:
            runs[count].append(steady(simulate(["--clients", str(args.clients), "--rounds", str(args.rounds),
                                                "--aggregators", str(count)])))
            loads.append(os.getloadavg()[0])
            print(f"repeat {repeat + 1}, {count} aggregators: {runs[count][-1]}", flush=True)
    table = {}
    for count, rows in runs.items():
        table[count] = {key: spread([r[key] for r in rows]) for key in
                        ("round_seconds", "updates_per_second", "aggregator_cpu_ms_per_update")}
        table[count]["updates_by_aggregator"] = rows[-1]["updates_by_aggregator"]
        table[count]["cpu_ms_per_update_by_aggregator"] = rows[-1]["cpu_ms_per_update_by_aggregator"]
        print(f"{count} aggregators: updates/s {table[count]['updates_per_second']}, aggregator CPU ms per update "
              f"{table[count]['aggregator_cpu_ms_per_update']}, round s {table[count]['round_seconds']}; last run's "
              f"split {rows[-1]['updates_by_aggregator']}, CPU ms/update {rows[-1]['cpu_ms_per_update_by_aggregator']}")
    result = {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats, "cpus": os.cpu_count(),
              "load_1min": spread(loads), "cases": table, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
