"""Reading the aggregator's state files for the dashboard: fresh on each request, tolerant of gaps.

The aggregator (and the model registry) write three JSON files into the federation's state_dir:

- ``history.json``: one record per round (complete or abandoned), with an optional ``kpis`` block;
- ``fleet.json``: every device's last status and flags, and the round in progress;
- ``registry.json``: the model versions, the deployed one, and any canary rollout.

Each request stats the files and re-parses the ones that changed. A file that is missing yields ``None``; a file
caught half-written (or otherwise unparsable) yields its last good parse, marked stale, so the page neither
flickers nor breaks while a writer is mid-way. Nothing here writes anywhere.

`DashboardState.snapshot()` builds the document served as ``/api/state`` (see `fedlite.dashboard.server` for its
shape): the rounds reduced to what the charts need, the latest round's per-client detail, the fleet and the registry.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlite.aggregator.ledger import run_totals

FILES = ("history", "fleet", "registry")

# Per-round fields the charts use, copied as they are when present.
ROUND_FIELDS = ("round", "status", "close_reason", "selected", "accepted", "declined", "declined_by_gate", "aborted",
                "timed_out", "cut_off", "rejected", "refusals", "clipped", "examples", "bytes_up", "bytes_down",
                "accuracy", "loss", "duration_seconds", "started_at", "completed_at", "epsilon", "delta")
# KPI fields kept for every round (the bulky per-client ones only for the latest round).
ROUND_KPIS = ("successful_client_rounds", "cumulative_successful_client_rounds", "bytes_per_accuracy_point",
              "epsilon", "client_accuracy_mean", "client_accuracy_std", "client_accuracy_p10", "personalization")


@dataclass
class _Cached:
    signature: tuple[int, int]
    value: Any


@dataclass
class FileRead:
    """One state file as last read: its parsed value (or None), and whether that value is out of date."""

    value: Any
    present: bool
    stale: bool = False
    error: str | None = None


class JsonFiles:
    """Stat-and-reparse reader with a last-good fallback; safe to share between request threads."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def read(self, name: str) -> FileRead:
        path = self.folder / f"{name}.json"
        try:
            st = path.stat()
        except OSError:
            return FileRead(None, present=False)
        signature = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached.signature == signature:
            return FileRead(cached.value, present=True)
        try:
            value = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:  # half-written, truncated, or replaced under us
            return FileRead(cached.value if cached else None, present=True, stale=True,
                            error=f"{path.name}: {type(exc).__name__}")
        with self._lock:
            self._cache[name] = _Cached(signature, value)
        return FileRead(value, present=True)


def _number(value: Any) -> float | None:
    """A finite number, or None (JSON from Python may carry NaN/Infinity, which the browser's JSON rejects)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _clean(value: Any) -> Any:
    """Make a parsed value safe for strict JSON: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def client_accuracies(record: dict[str, Any]) -> list[float]:
    """The global model's accuracy on each participant's own data: from the KPI block, else from client_metrics."""
    kpis = record.get("kpis") if isinstance(record.get("kpis"), dict) else {}
    listed = kpis.get("client_accuracies")
    if isinstance(listed, list):
        return [v for v in (_number(a) for a in listed) if v is not None]
    metrics = record.get("client_metrics")
    if not isinstance(metrics, dict):
        return []
    values = (_number(m.get("eval_accuracy_before")) for m in metrics.values() if isinstance(m, dict))
    return [v for v in values if v is not None]


def fairness(accuracies: list[float]) -> dict[str, float | None]:
    """Mean, population std and 10th percentile (linear interpolation, as numpy's default)."""
    if not accuracies:
        return {"client_accuracy_mean": None, "client_accuracy_std": None, "client_accuracy_p10": None}
    values = sorted(accuracies)
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    pos = 0.1 * (n - 1)
    low = math.floor(pos)
    high = min(low + 1, n - 1)
    p10 = values[low] + (values[high] - values[low]) * (pos - low)
    return {"client_accuracy_mean": mean, "client_accuracy_std": std, "client_accuracy_p10": p10}


def summarize_round(record: dict[str, Any]) -> dict[str, Any]:
    """What the per-round charts need from one history record; KPIs filled in from raw fields when absent."""
    out = {k: _clean(record[k]) for k in ROUND_FIELDS if k in record}
    out.setdefault("cut_off", 0)  # history written before cut-off rounds were counted apart
    kpis = record.get("kpis") if isinstance(record.get("kpis"), dict) else {}
    derived = fairness(client_accuracies(record))
    out["kpis"] = {k: _clean(kpis[k]) if k in kpis else derived.get(k) for k in ROUND_KPIS}
    out["kpis"]["present"] = bool(kpis)
    if out.get("epsilon") is None and out["kpis"].get("epsilon") is not None:
        out["epsilon"] = out["kpis"]["epsilon"]
    return out


def latest_detail(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The latest complete round's per-client view: accuracies, norms, cosines and flags."""
    if record is None:
        return None
    kpis = record.get("kpis") if isinstance(record.get("kpis"), dict) else {}
    metrics = record.get("client_metrics") if isinstance(record.get("client_metrics"), dict) else {}
    return _clean({
        "round": record.get("round"),
        "client_accuracies": client_accuracies(record),
        "client_metrics": metrics,
        "update_norms": record.get("update_norms") or {},
        "cosine_similarity": kpis.get("cosine_similarity") or {},
        "drift_flags": kpis.get("drift_flags") or [],
        "anomaly_flags": kpis.get("anomaly_flags") or [],
        **fairness(client_accuracies(record)),
        **{k: kpis[k] for k in ROUND_KPIS if k in kpis},
    })


def totals(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Run totals over the summarized rounds."""
    complete = [r for r in rounds if r.get("status") == "complete"]
    gates: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in rounds:
        for gate, n in (r.get("declined_by_gate") or {}).items():
            gates[gate] = gates.get(gate, 0) + int(_number(n) or 0)
        for reason, n in (r.get("rejected") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(_number(n) or 0)
    last = complete[-1] if complete else {}
    return {
        "rounds": len(rounds),
        "complete": len(complete),
        "abandoned": sum(1 for r in rounds if r.get("status") == "abandoned"),
        "successful_client_rounds": sum(int(_number(r.get("accepted")) or 0) for r in complete),
        "bytes_up": sum(int(_number(r.get("bytes_up")) or 0) for r in rounds),
        "bytes_down": sum(int(_number(r.get("bytes_down")) or 0) for r in rounds),
        "timed_out": sum(int(_number(r.get("timed_out")) or 0) for r in rounds),
        "cut_off": sum(int(_number(r.get("cut_off")) or 0) for r in rounds),
        "declined_by_gate": gates,
        "rejected": reasons,
        "refused": run_totals(rounds),
        "accuracy": last.get("accuracy"),
        "loss": last.get("loss"),
        "epsilon": last.get("epsilon"),
        "bytes_per_accuracy_point": (last.get("kpis") or {}).get("bytes_per_accuracy_point"),
        "personalization": (last.get("kpis") or {}).get("personalization"),
    }


LIVENESS = ("online", "training", "stale", "offline")


def run_ended(fleet: dict[str, Any], now: float) -> float | None:
    """When the run ended, if it has: fleet.json's ``ended_at`` (the aggregator's last write, once its rounds are
    over or it stops), else its ``updated_at`` when that is older than ``status_ttl_seconds`` (an aggregator that
    was killed writes no end); None while the aggregator is at work."""
    ended, updated, ttl = (_number(fleet.get(k)) for k in ("ended_at", "updated_at", "status_ttl_seconds"))
    if ended is not None:
        return ended
    return updated if updated is not None and ttl is not None and now - updated > ttl else None


def liveness(device: dict[str, Any], ttl: float | None, ended: float | None, now: float) -> tuple[str, str]:
    """A device's liveness at `now` and why: offline (its last status said so), stale (no status for longer than
    ``status_ttl_seconds``, or the run has ended: nobody collects its status any more), else its reported state."""
    seen = _number(device.get("last_seen"))
    if device.get("state") == "offline":
        return "offline", "its last status said offline"
    if ended is not None:
        return "stale", "the run has ended: its status is no longer collected"
    if device.get("stale") or (ttl is not None and (seen is None or now - seen > ttl)):
        return "stale", f"no status for over {ttl:g} s" if ttl is not None else "no recent status"
    return ("training" if device.get("state") == "training" else "online"), ""


def judge_liveness(fleet: dict[str, Any], now: float) -> dict[str, Any]:
    """The fleet with each device's ``liveness`` (and ``stale``: not online or training) judged at `now`, its
    ``counts`` recounted from them, and ``run_ended`` (unix seconds or None): fleet.json is no longer rewritten once
    the aggregator has stopped, so what it last said of a device is history."""
    ttl = _number(fleet.get("status_ttl_seconds"))
    devices = fleet.get("devices")
    if not isinstance(devices, list):
        return fleet
    ended = run_ended(fleet, now)
    judged = []
    for device in devices:
        if isinstance(device, dict):
            state, why = liveness(device, ttl, ended, now)
            device = {**device, "liveness": state, "liveness_reason": why, "stale": state in ("stale", "offline")}
        judged.append(device)
    return {**fleet, "devices": judged, "run_ended": ended, "counts": recount(judged)}


def recount(devices: list[Any]) -> dict[str, int]:
    """The fleet's counts by judged liveness: known, online (training included), eligible, training, stale, offline."""
    states = [d for d in devices if isinstance(d, dict)]
    by = {state: sum(1 for d in states if d.get("liveness") == state) for state in LIVENESS}
    return {"known": len(states), "online": by["online"] + by["training"],
            "eligible": sum(1 for d in states if d.get("liveness") == "online" and d.get("eligible")),
            "training": by["training"], "stale": by["stale"], "offline": by["offline"]}


def _records(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [r for r in value if isinstance(r, dict) and isinstance(r.get("round"), int)]


class DashboardState:
    """The dashboard's read-only view of one state_dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.files = JsonFiles(self.state_dir)

    def read(self) -> dict[str, FileRead]:
        return {name: self.files.read(name) for name in FILES}

    def history(self) -> list[dict[str, Any]]:
        return _records(self.files.read("history").value)

    def fleet(self) -> dict[str, Any] | None:
        value = self.files.read("fleet").value
        return _clean(value) if isinstance(value, dict) else None

    def registry(self) -> dict[str, Any] | None:
        value = self.files.read("registry").value
        return _clean(value) if isinstance(value, dict) else None

    def snapshot(self) -> dict[str, Any]:
        reads = self.read()
        records = _records(reads["history"].value)
        rounds = [summarize_round(r) for r in records]
        latest = next((r for r in reversed(records) if r.get("status") == "complete"), None)
        now = time.time()
        fleet = judge_liveness(reads["fleet"].value, now) if isinstance(reads["fleet"].value, dict) else None
        registry = reads["registry"].value if isinstance(reads["registry"].value, dict) else None
        return {
            "now": now,
            "state_dir": os.fspath(self.state_dir),
            "files": {name: {"present": r.present, "stale": r.stale, "error": r.error} for name, r in reads.items()},
            "rounds": rounds,
            "totals": totals(rounds),
            "latest": latest_detail(latest),
            "fleet": _clean(fleet),
            "registry": _clean(registry),
        }
