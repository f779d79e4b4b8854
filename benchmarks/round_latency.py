"""Row 6: end-to-end round latency through Mosquitto with 10, 100 and 1000 virtual clients (`fedlite simulate`).

PLACEHOLDER until `fedlite simulate` is finished: `simulate_round_latency` runs
`<python> -m fedlite.cli simulate --clients N --rounds 3 --json` and parses its last stdout line as JSON
`{"clients": N, "round_seconds": [...], "updates_per_second": x}`. When the command is missing or fails, the
row says "not measured: ..." instead of a number.

    python benchmarks/round_latency.py [--clients 10,100,1000] [--timeout 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchlib import MAIN_PYTHON, ROOT, emit, median


def simulate_available(python: Path = MAIN_PYTHON) -> bool:
    proc = subprocess.run([str(python), "-m", "fedlite.cli", "simulate", "--help"], capture_output=True, text=True,
                          check=False, timeout=60, cwd=ROOT)
    return proc.returncode == 0 and "--clients" in proc.stdout


# ==== PLACEHOLDER: wire to the final `fedlite simulate` interface once the lead has landed it ====
def simulate_round_latency(clients: int, rounds: int = 3, timeout: float = 600,
                           python: Path = MAIN_PYTHON) -> dict[str, Any]:
    """One `fedlite simulate` run; its last stdout line is JSON with clients, round_seconds, updates_per_second."""
    with tempfile.TemporaryDirectory(prefix="fedlite-simulate-") as run_dir:
        cmd = [str(python), "-m", "fedlite.cli", "simulate", "--clients", str(clients), "--rounds", str(rounds),
               "--json", "--run-dir", run_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fedlite simulate exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    result = json.loads(lines[-1])
    return {"clients": int(result["clients"]), "round_seconds": [float(s) for s in result["round_seconds"]],
            "median_round_seconds": median([float(s) for s in result["round_seconds"]]),
            "updates_per_second": float(result["updates_per_second"])}
# ==== END PLACEHOLDER ====


def measure(clients: list[int], rounds: int = 3, timeout: float = 600) -> list[dict[str, Any]]:
    if not simulate_available():
        return [{"clients": n, "status": "not measured: simulate not available"} for n in clients]
    rows = []
    for n in clients:
        try:
            rows.append(simulate_round_latency(n, rounds, timeout) | {"status": "ok"})
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
            rows.append({"clients": n, "status": f"not measured: {str(exc).splitlines()[0][:200]}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    emit(measure([int(n) for n in args.clients.split(",")], args.rounds, args.timeout))


if __name__ == "__main__":
    main()
