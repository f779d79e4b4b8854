"""Run every fedlite-vs-Flower benchmark side by side and print one markdown table (plus JSON).

    python benchmarks/run.py                       # full run (~10 min), under .venv-bench (re-execs there)
    python benchmarks/run.py --quick               # smaller sizes and fewer repeats
    python benchmarks/run.py --smoke               # tiny sizes; runs without Flower (its columns say n/a)
    python benchmarks/run.py --out benchmarks/RESULTS.md --json benchmarks/results.json

Flower (`flwr`) lives only in .venv-bench (see benchmarks/setup); without it, and unless --smoke or
--no-flower is given, this script runs benchmarks/setup if needed and re-executes itself there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, BENCH_PYTHON, MIB, ROOT, flower_version, machine


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one run mode."""

    uplink_models: tuple[str, ...]
    aggregation: tuple[tuple[int, int, int], ...]  # (updates N, params P, repeats)
    footprint_model: str
    footprint_epochs: int
    footprint_supernode: bool
    footprint_trainers: tuple[str, ...]
    speed_models: tuple[str, ...]
    speed_samples: int
    speed_repeats: int
    rounds: int
    seeds: int
    latency_cases: tuple[tuple[int, int], ...]  # (registered devices, selected per round)


FULL = Plan(("mlp", "mlp100k"),
            tuple((n, p, 5 if n < 1000 else (3 if p < 1_000_000 else 1)) for p in (100_000, 1_000_000)
                  for n in (10, 100, 1000)),
            "cnn", 5, True, ("tflite", "tf"), ("cnn", "mlp"), 2048, 5, 40, 3, ((10, 10), (1000, 1000), (10000, 1000)))
QUICK = Plan(("mlp", "mlp100k"),
             tuple((n, p, 3 if n < 1000 else 1) for p in (100_000, 1_000_000) for n in (10, 100, 1000)
                   if (n, p) != (1000, 1_000_000)),
             "cnn", 3, False, ("tflite",), ("cnn", "mlp"), 1024, 3, 30, 1, ((10, 10), (1000, 1000)))
SMOKE = Plan(("mlp",), ((5, 10_000, 1),), "mlp", 1, False, ("tflite",), ("mlp",), 256, 1, 2, 1, ())


# --- running the rows ------------------------------------------------------------------------------


def run_rows(plan: Plan, cache: Path, flower: bool) -> dict[str, Any]:
    import agent_footprint
    import aggregation
    import convergence
    import round_latency
    import training_speed
    import uplink

    results: dict[str, Any] = {}
    steps = {
        "uplink": lambda: [uplink.measure(m, cache) for m in plan.uplink_models],
        "aggregation": lambda: [aggregation.measure(p, n, r, flower) for n, p, r in plan.aggregation],
        "footprint": lambda: agent_footprint.measure(cache, plan.footprint_epochs, flower, plan.footprint_supernode,
                                                     list(plan.footprint_trainers), plan.footprint_model),
        "training_speed": lambda: training_speed.measure(list(plan.speed_models), cache, plan.speed_samples,
                                                         plan.speed_repeats),
        "convergence": lambda: convergence.measure(cache, plan.rounds, plan.seeds),
        "round_latency": lambda: round_latency.measure(list(plan.latency_cases), 4, 900),
    }
    for name, step in steps.items():
        started = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = step()
        results[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
    return results


# --- formatting ------------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}×" if r < 0.1 else f"{r:.2f}×"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "met" if ok else "**missed**"


def uplink_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[f"1. uplink bytes per update, {r['model']} ({r['params']:,} params)",
             f"{r['fedlite_bytes']:,} B (int8+zstd)", f"{r['flower_bytes']:,} B" if r["flower_bytes"] else "n/a",
             fmt_ratio(r["ratio"]), "≤ 0.27×", verdict(r["ratio"] <= 0.27 if r["ratio"] is not None else None)]
            for r in rows]


def aggregation_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        flower = "time_ratio" in r
        lo, hi = r.get("fedlite_seconds_min_max", [r["fedlite_seconds"]] * 2)
        label = (f"2. aggregation N={r['updates']}, P={r['params'] / 1e6:.1f}M, service path, 2 threads "
                 f"(median of {r['repeats']}, min {lo:.3f} s, max {hi:.3f} s)")
        target, ok = "", None
        if r["updates"] == 100 and r["params"] >= 1_000_000 and flower:
            target = "time ≤ 0.5×, growth ≤ 20 MiB"
            ok = r["time_ratio"] <= 0.5 and r["fedlite_peak_bytes"] <= 20 * MIB
        ours = (f"{r['fedlite_seconds']:.3f} s (CPU {r['fedlite_cpu_seconds']:.3f} s), "
                f"{fmt_bytes(r['fedlite_peak_bytes'])}")
        for variant, name in (("fedlite_1", "1 thread"), ("fedlite_proc", "2 processes")):
            if f"{variant}_seconds" in r:
                ours += f"; {name} {r[f'{variant}_seconds']:.3f} s (CPU {r[f'{variant}_cpu_seconds']:.3f} s)"
        theirs = (f"{r['flower_seconds']:.3f} s (CPU {r['flower_cpu_seconds']:.3f} s), "
                  f"{fmt_bytes(r['flower_peak_bytes'])}") if flower else "n/a"
        out.append([label, ours, theirs,
                    f"time {fmt_ratio(r['time_ratio'])} (CPU {fmt_ratio(r['cpu_ratio'])}), memory "
                    f"{fmt_ratio(r['memory_ratio'])}" if flower else "n/a", target or "—",
                    verdict(ok) if target else "—"])
    return out


def footprint_rows(f: dict[str, Any]) -> list[list[str]]:
    flower, node = f.get("flower_tflite"), f.get("flower_supernode")
    idle_flower = fmt_bytes(flower["idle_bytes"]) + " (ClientApp process)" if flower else "n/a"
    if node:
        idle_flower += f"; SuperNode + SuperExec {fmt_bytes(node['idle_bytes'])}"
    ratio = fmt_ratio(f.get("idle_ratio"))
    if node:
        ratio += f"; vs SuperNode stack {fmt_ratio(f['idle_ratio_vs_supernode'])}"
    train_flower = fmt_bytes(flower["train_peak_bytes"]) + " (TFLite trainer)" if flower else "n/a"
    if f.get("flower_tf"):
        train_flower += f"; {fmt_bytes(f['flower_tf']['train_peak_bytes'])} (TF trainer)"
    model = f"{f['model']}, {f['epochs']} epochs on {int(0.8 * f['shard'])} examples"
    mine = f["fedlite"]
    idle_mine = (f"{fmt_bytes(mine['idle_bytes'])} (PSS {fmt_bytes(mine['idle_pss_bytes'])}); after a round "
                 f"{fmt_bytes(mine['after_round_bytes'])} (PSS {fmt_bytes(mine['after_round_pss_bytes'])})")
    return [[f"3. device idle RSS ({model})", idle_mine, idle_flower, ratio,
             "< 60 MiB; ≤ 0.5× Flower", f"{verdict(f['met_idle'])}; {verdict(f['met_idle_ratio'])} (ClientApp)"
             + (f"; {verdict(f['idle_ratio_vs_supernode'] <= 0.5)} (SuperNode)" if node else "")],
            [f"3. device peak RSS in one round ({model})", fmt_bytes(f["fedlite"]["train_peak_bytes"]), train_flower,
             fmt_ratio(f.get("train_ratio")), "< 120 MiB", verdict(f["met_train"])]]


def speed_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    def rate(r: dict[str, Any], side: str, name: str) -> str:
        spread, cpu = r[f"{side}_rate"], r[f"{side}_cpu_s_per_1k"]
        return (f"{spread['median']:,.0f} samples/s ({name}; min {spread['min']:,.0f}, max {spread['max']:,.0f}; "
                f"CPU {cpu:.3f} s per 1k samples)")

    return [[f"4. training speed, {r['model']} ({r['params']:,} params), batch {r['batch']}, 1 thread, "
             f"{r['repeats']} repeats of ≥ {r['min_seconds_per_repeat']:g} s",
             rate(r, "tflite", "TFLite"), rate(r, "tf", "TF"), f"{r['ratio']:.2f}× faster", "—", "—"] for r in rows]


def convergence_rows(c: dict[str, Any]) -> list[list[str]]:
    def acc(v: str) -> str:
        final = c[f"{v}_final"]
        if final is None:
            return "n/a"
        to = c[f"{v}_rounds_to_target"]
        return f"{100 * final:.2f} %, {to if to is not None else '>' + str(c['rounds'])} rounds to 90 %"

    label = (f"5. digits, {c['clients']} clients, Dirichlet α={c['alpha']}, {c['rounds']} rounds, "
             f"{c['seeds']} seed(s): final accuracy")
    return [[label, f"int8: {acc('int8')}; float32: {acc('float32')}", f"FedAvg: {acc('flower')}",
             f"int8 − float32 {c['int8_gap_points']:+.2f} pt", "|int8 − float32| ≤ 0.5 pt", verdict(c["met"])]]


def latency_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        label = f"6. round latency, {r['clients']:,} devices, {r['clients_per_round']:,} per round, via Mosquitto"
        if r.get("status") != "ok":
            out.append([label, r["status"], "—", "—", "—", "—"])
            continue
        limit = 5.0 if r["clients"] <= 1000 else 10.0
        cpu = ", ".join(f"{name} {seconds:.2f}" for name, seconds in r["median_cpu_seconds"].items())
        target = f"< {limit:g} s" if r["clients_per_round"] >= 1000 else "—"
        ok = r["median_round_seconds"] < limit if r["clients_per_round"] >= 1000 else None
        out.append([label, f"{r['median_round_seconds']:.2f} s median (min {r['min_round_seconds']:.2f}, max "
                    f"{r['max_round_seconds']:.2f}; {r['updates_per_second']:.0f} updates/s); CPU s per round: "
                    f"{cpu}", "not measured (Flower's simulation runs its clients in-process, no network between)",
                    "—", target,
                    verdict(ok) if ok is not None else "—"])
    return out


def table(results: dict[str, Any]) -> str:
    rows = (uplink_rows(results["uplink"]) + aggregation_rows(results["aggregation"])
            + footprint_rows(results["footprint"]) + speed_rows(results["training_speed"])
            + convergence_rows(results["convergence"]) + latency_rows(results["round_latency"]))
    head = ["measure", "fedlite", "Flower", "ratio (fedlite / Flower)", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(results: dict[str, Any], info: dict[str, Any], mode: str) -> str:
    m = info
    return "\n".join([
        "# fedlite vs Flower: benchmark results", "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Mode: {mode}. Command: `python benchmarks/run.py"
        f"{'' if mode == 'full' else ' --' + mode}`.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['platform']}; Python {m['python']}; "
        f"flwr {m['flwr']}, tensorflow-cpu {m['tensorflow']}, ai-edge-litert {m['ai_edge_litert']}, numpy "
        f"{m['numpy']}, zstandard {m['zstandard']}, Mosquitto {m['mosquitto']}. The machine is shared and was busy "
        "(other jobs running): times are medians of repeated fresh-process runs; memory is measured per process.",
        "", table(results), "",
        "What each row measures: see benchmarks/README.md. Raw numbers (every repeat): the JSON file.", ""])


# --- entry point -----------------------------------------------------------------------------------


def ensure_flower_env(argv: list[str]) -> None:
    """Re-execute under .venv-bench (running benchmarks/setup first if it is missing)."""
    if Path(sys.prefix).resolve() == BENCH_PYTHON.parent.parent.resolve():  # already there (not via symlinks)
        raise SystemExit("flwr is not importable in .venv-bench: run benchmarks/setup")
    if not BENCH_PYTHON.exists():
        subprocess.run([str(BENCH_DIR / "setup")], check=True)
    os.execv(str(BENCH_PYTHON), [str(BENCH_PYTHON), str(Path(__file__).resolve()), *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (~4 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes; Flower optional (for the test suite)")
    parser.add_argument("--no-flower", action="store_true", help="run the fedlite columns only")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--cache", type=Path, help="exported models (default: a temporary folder)")
    args = parser.parse_args(argv)
    flower = flower_version() is not None and not args.no_flower
    if not flower and not (args.smoke or args.no_flower):
        ensure_flower_env(argv)
    plan, name = (SMOKE, "smoke") if args.smoke else (QUICK, "quick") if args.quick else (FULL, "full")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory(prefix="fedlite-bench-") as tmp:
        started = time.perf_counter()
        results = run_rows(plan, args.cache or Path(tmp), flower)
    info = machine()
    document = {"mode": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info, "flower": flower,
                "seconds": round(time.perf_counter() - started, 1), "results": results}
    text = report(results, info, name)
    print(text)
    print(json.dumps(document))
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    raise SystemExit(main())
