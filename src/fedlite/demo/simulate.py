"""Load-test rounds: many virtual devices in a few processes (`demo.fleet`) against a real broker and aggregator.

Each round's record comes with the CPU seconds each component spent since the previous record (aggregator,
broker, the virtual fleet), read from /proc, so that a round's wall time can be split by who spent it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.record import RoundRecord
from fedlite.demo.cluster import LocalFederation, follow_history
from fedlite.demo.datasets import load_task

FEDERATION = "sim"


@dataclass
class SimulationPlan:
    clients: int
    rounds: int = 3
    processes: int = 4
    clients_per_round: int = 0  # 0: every client
    deadline_seconds: float = 300.0
    examples_per_client: int = 32
    status_interval_seconds: float = 30.0  # the agent's default
    task: str = "digits"
    aggregators: int = 1  # > 1: that many aggregator processes share the work (`aggregator.cluster`)
    sites: int = 0  # > 0: the devices split between that many edge sites (a bridged broker and aggregator each)


def run_simulation(plan: SimulationPlan, run_dir: Path, progress: Any = print) -> dict[str, Any]:
    """Run `plan.rounds` rounds with `plan.clients` virtual agents; return round times and throughput."""
    task = load_task(plan.task)
    run_dir.mkdir(parents=True, exist_ok=True)
    devices = [f"sim-{i:05d}" for i in range(plan.clients)]
    per_round = plan.clients_per_round or plan.clients
    sites = ({f"site-{i + 1}": list(chunk) for i, chunk in enumerate(np.array_split(np.array(devices), plan.sites))}
             if plan.sites else {})
    with LocalFederation(run_dir, FEDERATION, [] if sites else devices, tls=False) as fed:
        started = time.time()
        fed.start_broker(sites=bool(sites))
        progress(f"broker up with {plan.clients} enrolled devices ({time.time() - started:.1f} s)")
        data = run_dir / "data.npz"
        np.savez(data, x=task.x_train, y=task.y_train)
        config = fed.aggregator_config(
            model={"arch": task.arch, "input_shape": list(task.input_shape), "classes": task.classes,
                   "options": task.options, "export_every": 0},
            rounds={"total": plan.rounds, "clients_per_round": per_round, "over_selection": 0.0,
                    "quorum": max(1, int(per_round * 0.9)), "deadline_seconds": plan.deadline_seconds,
                    "wait_for_devices_seconds": 120.0, "status_ttl_seconds": 10 * plan.status_interval_seconds},
            training={"epochs": 1, "batch_size": 16, "learning_rate": task.lr},
            **fed.cluster_tables(max(plan.aggregators, 2 if sites else 1)),
        )
        aggregators = _start_aggregators(fed, plan, config, sites, progress)
        aggregator = next(iter(aggregators.values()))
        if sites:
            for name, site_devices in sites.items():
                broker = fed.sites[name].broker
                _start_workers(fed, max(1, plan.processes // plan.sites), site_devices, data, plan,
                               (broker.device_host, broker.device_port or 0), name)
        else:
            _start_workers(fed, plan.processes, devices, data, plan,
                           (fed.broker.device_host, fed.broker.device_port or 0))
        progress(f"{plan.processes} processes of virtual devices started; waiting for {plan.rounds} rounds")
        meter = CpuMeter({"aggregator": [p.popen.pid for p in aggregators.values()],
                          "broker": [fed.broker.pid or 0, *(s.broker.pid or 0 for s in fed.sites.values())],
                          "fleet": [p.popen.pid for n, p in fed.processes.items() if n.startswith("worker-")]}
                         | {f"aggregator {name}": [p.popen.pid] for name, p in aggregators.items()})
        central = ByteMeter(fed.broker.pid or 0)
        cpu: list[dict[str, float]] = []
        traffic: list[int] = []

        def show(record: RoundRecord) -> None:
            cpu.append(meter.spent())
            traffic.append(central.spent())
            split = ", ".join(f"{name} {seconds:.2f}" for name, seconds in cpu[-1].items())
            progress(f"round {record.round}: {record.status}, {record.accepted}/{record.selected} "
                     f"updates in {record.duration_seconds:.2f} s (CPU s since the last record: {split}; central "
                     f"broker {traffic[-1]} B)")

        history = follow_history(fed, aggregator, 120 + plan.rounds * (plan.deadline_seconds + 60), show, poll=0.1)
    return _summary(plan, per_round, history, cpu, list(aggregators)) | {"central_broker_bytes_per_round": [
        n for r, n in zip(history, traffic, strict=False) if r.complete]}


def _start_aggregators(fed: LocalFederation, plan: SimulationPlan, config: Path, sites: dict[str, list[str]],
                       progress: Any) -> dict[str, Any]:
    """{name: process}, the coordinator first: one aggregator (a1), several (a1 coordinates), or a central one and
    one per site."""
    if sites:
        aggregators = {"central": fed.start_central(config)} | fed.start_sites(config, sites)
        progress(f"{len(sites)} edge sites, each a broker bridged to the central one and a site aggregator")
        return aggregators
    if plan.aggregators > 1:
        progress(f"{plan.aggregators} aggregators: a1 coordinates, the others are members")
        return {f"a{i + 1}": p for i, p in enumerate(fed.start_aggregators(config, plan.aggregators))}
    return {"a1": fed.start("aggregator", "aggregator", config)}


class ByteMeter:
    """Bytes a process has read and written (sockets included; /proc/<pid>/io rchar + wchar) between calls."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._last = self._read()

    def _read(self) -> int:
        try:
            fields = dict(line.split(": ") for line in Path(f"/proc/{self.pid}/io").read_text().splitlines())
        except (OSError, ValueError):
            return 0
        return int(fields["rchar"]) + int(fields["wchar"])

    def spent(self) -> int:
        now = self._read()
        spent, self._last = max(0, now - self._last), now
        return spent


class CpuMeter:
    """CPU seconds (user + system) spent by groups of processes between calls to `spent`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        return {name: sum(_cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}

    def spent(self) -> dict[str, float]:
        now = self._read()
        spent = {name: round(max(0.0, now[name] - self._last[name]), 3) for name in now}
        self._last = now
        return spent


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_workers(fed: LocalFederation, processes: int, devices: list[str], data: Path, plan: SimulationPlan,
                   broker: tuple[str, int], prefix: str = "") -> None:
    """`processes` worker processes of virtual devices, connected to `broker` (a plain device listener)."""
    first = sum(1 for name in fed.processes if name.startswith("worker-"))  # numbers are the fleet's, not a site's
    for worker, chunk in enumerate(np.array_split(np.array(devices), processes), start=first):
        name = f"worker-{prefix + '-' if prefix else ''}{worker}"
        spec = {
            "worker": worker, "run_dir": str(fed.run_dir), "federation": FEDERATION, "data": str(data),
            "host": broker[0], "port": broker[1],
            "devices": {c: fed.passwords[c] for c in chunk},
            "examples_per_client": plan.examples_per_client,
            "status_interval_seconds": plan.status_interval_seconds,
            "aggregator_key": str(fed.signing_key.with_suffix(".pub")),
        }
        path = fed.run_dir / f"{name}.json"
        path.write_text(json.dumps(spec))
        fed.start_command(name, [sys.executable, "-m", "fedlite.demo.simulate_worker", str(path)])


def _summary(plan: SimulationPlan, per_round: int, history: list[RoundRecord], cpu: list[dict[str, float]],
             names: list[str]) -> dict[str, Any]:
    complete = [r for r in history if r.complete]
    cycles = [c for r, c in zip(history, cpu, strict=False) if r.complete]
    seconds = [round(r.duration_seconds, 3) for r in complete]
    accepted = sum(r.accepted for r in complete)
    updates = {name: [r.aggregators.get(name, 0) if len(names) > 1 else r.accepted for r in complete]
               for name in names}
    spent = {name: [c.get(f"aggregator {name}", 0.0) for c in cycles] for name in names}
    return {
        "clients": plan.clients,
        "clients_per_round": per_round,
        "rounds": len(complete),
        "round_seconds": seconds,
        "median_round_seconds": float(np.median(seconds)) if seconds else None,
        "updates_per_second": accepted / sum(seconds) if seconds else None,
        "bytes_up_per_round": [r.bytes_up for r in complete],
        "timed_out": sum(r.timed_out for r in history),  # selected, silent when a round's deadline passed
        "cut_off": sum(r.cut_off for r in history),  # selected, still training when a round had its K updates
        "accuracy": complete[-1].accuracy if complete else None,
        "cpu_seconds_per_round": {name: [c[name] for c in cycles] for name in (cycles[0] if cycles else {})
                                  if not name.startswith("aggregator ")},
        "aggregators": {name: _totals(updates[name], spent[name]) for name in names},
        "cpu_seconds_per_round_by_aggregator": spent,
        "updates_per_round_by_aggregator": updates,
    }


def _totals(updates: list[int], cpu_seconds: list[float]) -> dict[str, float | int | None]:
    """One aggregator's updates merged (its own partial sum) and CPU seconds, over the complete rounds."""
    total, cpu = sum(updates), round(sum(cpu_seconds), 3)
    return {"updates": total, "cpu_seconds": cpu, "cpu_ms_per_update": round(1000 * cpu / total, 3) if total else None}
