"""Central broker traffic per round, flat (every device on the central broker) vs edge sites (`--sites`).

Each case is `fedlite simulate --clients N --rounds R [--sites S] --json`: the lean virtual fleet on real
Mosquitto brokers. Flat: every device's status, model download and update cross the central broker, and it relays
each update to the aggregator. With S sites: each site's devices talk to their site broker only; its bridge carries
the signed broadcasts down once per site and the site aggregator's claims, presence and one partial sum per round
up (plus the devices' small statuses and reports). The measure is what the central broker process read and wrote
per round (/proc/<pid>/io rchar + wchar: its sockets, TLS bridges included; its log lines too, a few hundred bytes
a round), over the steady rounds (round 1 with its connections and model downloads left out), min / median / max
over the rounds of all repeats, with each case's round seconds and aggregator CPU seconds beside it.

    python benchmarks/edge_sites.py [--sites 0,2,4] [--clients 400] [--rounds 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchlib import emit, simulate, spread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="0,2,4", help="site counts to compare (0: flat)")
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("edge_sites.json"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.sites.split(",")]
    rounds: dict[int, list[dict[str, float]]] = {c: [] for c in counts}
    loads = [os.getloadavg()[0]]
    for repeat in range(args.repeats):
        for count in counts:  # cases alternate within each repeat
            result = simulate(["--clients", str(args.clients), "--rounds", str(args.rounds), "--sites", str(count)])
            for i in range(1, result["rounds"]):
                rounds[count].append({"central_bytes": result["central_broker_bytes_per_round"][i],
                                      "round_seconds": result["round_seconds"][i],
                                      "aggregator_cpu_seconds": result["cpu_seconds_per_round"]["aggregator"][i]})
            loads.append(os.getloadavg()[0])
            print(f"repeat {repeat + 1}, {count or 'no'} sites: central broker bytes per round "
                  f"{result['central_broker_bytes_per_round']}", flush=True)
    table = {}
    for count, rows in rounds.items():
        table[count] = {key: spread([r[key] for r in rows]) for key in rows[0]}
        table[count]["central_bytes_per_device_round"] = round(table[count]["central_bytes"]["median"] / args.clients,
                                                               1)
    flat = table.get(0)
    for count, row in table.items():
        ratio = f", {flat['central_bytes']['median'] / row['central_bytes']['median']:.1f} x less than flat" \
            if flat and count else ""
        print(f"{count or 'no'} sites: central broker MB per round {_mb(row['central_bytes'])}{ratio}; "
              f"round s {row['round_seconds']}; aggregator CPU s per round {row['aggregator_cpu_seconds']}")
    out = {"clients": args.clients, "rounds": args.rounds, "repeats": args.repeats, "cpus": os.cpu_count(),
           "load_1min": spread(loads), "cases": table}
    args.out.write_text(json.dumps(out, indent=1))
    emit(out)


def _mb(values: dict[str, float]) -> str:
    return " / ".join(f"{values[k] / 1e6:.2f}" for k in ("min", "median", "max"))


if __name__ == "__main__":
    main()
