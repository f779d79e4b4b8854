"""Row 6: end-to-end round latency through Mosquitto with many virtual devices (`fedlite simulate`).

Each case runs `<python> -m fedlite.cli simulate --clients N --clients-per-round K --rounds R --json` (the lean
virtual fleet of `demo/fleet.py`: real MQTT links, signatures, selection and codec, one TFLite training per
fleet process and round) and reads its JSON summary: per-round wall seconds and, per round, the CPU seconds the
aggregator, the broker and the fleet spent. The first round (connections, model download, warm-up) is reported
but left out of the median.

    python benchmarks/round_latency.py [--cases 10:10,1000:1000,10000:1000] [--rounds 4] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchlib import MAIN_PYTHON, ROOT, emit, median


def simulate_round_latency(clients: int, per_round: int, rounds: int = 4, timeout: float = 900,
                           python: Path = MAIN_PYTHON) -> dict[str, Any]:
    """One `fedlite simulate` run: its round times (the first one aside) and per-component CPU per round."""
    with tempfile.TemporaryDirectory(prefix="fedlite-simulate-") as run_dir:
        cmd = [str(python), "-m", "fedlite.cli", "simulate", "--clients", str(clients), "--clients-per-round",
               str(per_round), "--rounds", str(rounds), "--json", "--run-dir", run_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fedlite simulate exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    result = json.loads(lines[-1])
    seconds = [float(s) for s in result["round_seconds"]]
    steady = seconds[1:] or seconds
    cpu = {name: median(values[1:] or values) for name, values in result["cpu_seconds_per_round"].items()}
    return {"clients": clients, "clients_per_round": per_round, "round_seconds": seconds,
            "median_round_seconds": median(steady), "min_round_seconds": min(steady),
            "max_round_seconds": max(steady), "median_cpu_seconds": cpu,
            "updates_per_second": float(result["updates_per_second"]), "status": "ok"}


def measure(cases: list[tuple[int, int]], rounds: int = 4, timeout: float = 900) -> list[dict[str, Any]]:
    rows = []
    for clients, per_round in cases:
        try:
            rows.append(simulate_round_latency(clients, per_round, rounds, timeout))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            rows.append({"clients": clients, "clients_per_round": per_round,
                         "status": f"not measured: {str(exc).splitlines()[0][:200]}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="10:10,1000:1000,10000:1000", help="registered:per-round, ...")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")]
    emit(measure(cases, args.rounds, args.timeout))


if __name__ == "__main__":
    main()
