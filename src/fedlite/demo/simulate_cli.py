"""`fedlite simulate`: load-test rounds with many virtual agents through the real broker and aggregator."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=100, help="virtual devices (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds to run")
    parser.add_argument("--processes", type=int, default=4, help="processes the virtual devices share")
    parser.add_argument("--clients-per-round", type=int, default=0, help="K (default: every client)")
    parser.add_argument("--deadline", type=float, default=300.0, help="round deadline in seconds")
    parser.add_argument("--aggregators", type=int, default=1,
                        help="aggregator processes sharing the work on one federation (default 1)")
    parser.add_argument("--sites", type=int, default=0,
                        help="split the devices between this many edge sites: a broker each, bridged to the "
                             "central one, and a site aggregator (default 0: one flat broker)")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/simulate-<time>")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")


def run(args: argparse.Namespace) -> int:
    from fedlite.demo.simulate import SimulationPlan, run_simulation

    if args.clients < 1 or args.processes < 1 or args.rounds < 1 or not 1 <= args.aggregators <= 16:
        print("fedlite simulate: --clients, --processes and --rounds must be >= 1, --aggregators 1 to 16")
        return 2
    if not 0 <= args.sites <= min(16, args.clients) or (args.sites and args.aggregators > 1):
        print("fedlite simulate: --sites must be 0 to 16 (and at most --clients), and not combined with --aggregators")
        return 2
    run_dir = args.run_dir or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    plan = SimulationPlan(clients=args.clients, rounds=args.rounds, processes=min(args.processes, args.clients),
                          clients_per_round=args.clients_per_round, deadline_seconds=args.deadline,
                          aggregators=args.aggregators, sites=args.sites)
    result = run_simulation(plan, run_dir.resolve())
    print(f"{result['clients']} clients, {result['clients_per_round']} per round: median round "
          f"{result['median_round_seconds']} s, {result['updates_per_second']:.0f} updates/s "
          f"through the broker and aggregator; rounds {result['round_seconds']}")
    print(f"unanswered selections: {result['timed_out']} timed out (deadline passed), {result['cut_off']} cut off "
          "(the round had its K updates first: not needed)")
    split = ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in
                      result["cpu_seconds_per_round"].items() if values)
    if split:
        print(f"median CPU seconds per round: {split}")
    traffic = result["central_broker_bytes_per_round"]
    if traffic:
        print(f"central broker: median {statistics.median(traffic) / 1e6:.2f} MB read + written per round")
    if args.aggregators > 1 or args.sites:
        print("per aggregator: " + ", ".join(f"{name} {a['updates']} updates, {a['cpu_seconds']:.2f} CPU s"
                                             for name, a in result["aggregators"].items()))
    if args.json:
        print(json.dumps(result))
    return 0
