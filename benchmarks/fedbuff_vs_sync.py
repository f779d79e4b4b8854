"""FedBuff vs synchronous rounds with stragglers: accuracy against wall time and bytes, the whole demo each time.

Each run is `fedlite demo` (real Mosquitto, aggregator and agent processes, the demo's unavailable devices) on
digits with 10 devices, simulated hardware whose training batches take at least `--batch-seconds`, and
`--stragglers` steady devices 5 x slower. Synchronous: `--rounds` rounds of the demo's 6 of 10; FedBuff: twice
as many versions of half as many updates (the same number of updates), 6 devices training at once. For each
seed, the target is the synchronous run's final accuracy (the mean of its last 3 rounds); reported are the wall
time (from the first round's start) and the bytes (up + down) each mode took to first reach it, and each
mode's final accuracy. The runs alternate modes; the machine load is printed.

    python benchmarks/fedbuff_vs_sync.py [--rounds 20] [--seeds 2] [--stragglers 3] [--batch-seconds 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import ROOT, emit

MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"


def demo(run_dir: Path, mode: str, rounds: int, seed: int, stragglers: int, batch_seconds: float) -> list[dict]:
    """Run one demo; its history (every attempt)."""
    total = rounds if mode == "sync" else 2 * rounds
    command = [str(MAIN_PYTHON), "-m", "fedlite.cli", "demo", "--rounds", str(total), "--mode", mode,
               "--seed", str(seed), "--stragglers", str(stragglers), "--batch-seconds", str(batch_seconds),
               "--run-dir", str(run_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"demo {mode} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "aggregator" / "history.json").read_text())


def curve(history: list[dict]) -> list[tuple[float, int, float]]:
    """(seconds since the first round began, cumulative bytes, accuracy) after each completed round."""
    start = min(r["started_at"] for r in history if r.get("started_at"))
    spent, out = 0, []
    for r in sorted(history, key=lambda r: (r.get("completed_at") or r.get("started_at") or 0)):
        spent += int(r.get("bytes_up") or 0) + int(r.get("bytes_down") or 0)
        if r.get("status") == "complete" and r.get("accuracy") is not None and r.get("completed_at"):
            out.append((r["completed_at"] - start, spent, float(r["accuracy"])))
    return out


def reach(points: list[tuple[float, int, float]], target: float) -> tuple[float | None, int | None]:
    hit = next(((t, b) for t, b, a in points if a >= target), None)
    return hit if hit else (None, None)


def measure(rounds: int, seeds: int, stragglers: int, batch_seconds: float) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            curves = {}
            for mode in ("sync", "fedbuff") if seed % 2 == 0 else ("fedbuff", "sync"):
                started, cpu = time.time(), os.times()
                curves[mode] = curve(demo(Path(tmp) / f"{mode}-{seed}", mode, rounds, seed, stragglers,
                                          batch_seconds))
                after = os.times()
                curves[mode + "_wall"] = time.time() - started
                curves[mode + "_cpu"] = (after.children_user + after.children_system
                                         - cpu.children_user - cpu.children_system)
            target = statistics.fmean(a for _, _, a in curves["sync"][-3:])
            row: dict[str, Any] = {"seed": seed, "target": target}
            for mode in ("sync", "fedbuff"):
                seconds, spent = reach(curves[mode], target)
                row[mode] = {"seconds_to_target": seconds, "bytes_to_target": spent,
                             "final_accuracy": statistics.fmean(a for _, _, a in curves[mode][-3:]),
                             "run_seconds": curves[mode + "_wall"], "cpu_seconds": curves[mode + "_cpu"],
                             "curve": curves[mode]}
            runs.append(row)
    return {"rounds": rounds, "seeds": seeds, "stragglers": stragglers, "batch_seconds": batch_seconds,
            "load_after": os.getloadavg(), "runs": runs}


def table(result: dict[str, Any]) -> str:
    lines = ["| seed | target (sync final) | sync: s / MB to target | fedbuff: s / MB to target | "
             "final accuracy sync / fedbuff | run CPU s sync / fedbuff |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        s, f = r["sync"], r["fedbuff"]

        def cell(m: dict[str, Any]) -> str:
            if m["seconds_to_target"] is None:
                return "not reached"
            return f"{m['seconds_to_target']:.1f} s / {m['bytes_to_target'] / 1e6:.2f} MB"

        lines.append(f"| {r['seed']} | {r['target']:.3f} | {cell(s)} | {cell(f)} | {s['final_accuracy']:.3f} / "
                     f"{f['final_accuracy']:.3f} | {s['cpu_seconds']:.0f} / {f['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--stragglers", type=int, default=3)
    parser.add_argument("--batch-seconds", type=float, default=0.05)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    print(f"load before: {os.getloadavg()}", file=sys.stderr)
    result = measure(args.rounds, args.seeds, args.stragglers, args.batch_seconds)
    if args.markdown:
        print(table(result))
    else:
        emit(result)


if __name__ == "__main__":
    main()
