"""Per-round KPIs: participation, bytes per accuracy point, privacy spent, fairness, drift, anomalies and the
devices' personalization A/B.

Fairness is the global model's accuracy on each client's own held-out data (numbers the devices report,
never data). Drift is a client's loss on its fresh local data rising over a window of rounds. Anomalies
are updates whose norm is a robust outlier or that point away from the round's aggregate; the cosine
similarity is computed on sketches of the updates: the same fixed uniform sample of coordinates from each (read
from the codes, no pass over the update), a linear map, so the aggregate's sketch is the weighted mean of the
clients' sketches and memory stays O(clients × samples). Sampling m of P coordinates estimates each inner
product without bias, with a relative error of order 1/sqrt(m) for updates spread over many coordinates.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np

from fedlite.aggregator.deltas import Delta, as_delta
from fedlite.aggregator.record import RoundRecord, records
from fedlite.settings import Range, require

SKETCH_SAMPLES = 4096


@dataclass
class KpiSettings:
    # rise of a client's loss above its best of the window that raises a flag
    drift_threshold: Annotated[float, Range(ge=0)] = 0.3
    drift_window: Annotated[int, Range(ge=2)] = 5  # rounds; a rise needs two of them
    anomaly_z: Annotated[float, Range(gt=0)] = 3.5  # robust z-score of the update norm (median / MAD)
    # an update pointing away from the aggregate is an outlier
    anomaly_min_cosine: Annotated[float, Range(ge=-1, le=1)] = 0.0
    anomaly_repeat: Annotated[int, Range(ge=1)] = 3  # outlier this many rounds of the window: flagged
    anomaly_window: Annotated[int, Range(ge=1)] = 5
    exclude_flagged: bool = False  # stop selecting clients flagged as anomalous

    def validate(self) -> None:
        require(self.anomaly_repeat <= self.anomaly_window,
                f"anomaly_repeat must be <= anomaly_window ({self.anomaly_window}), not {self.anomaly_repeat}: "
                "no client could ever be flagged")


class Sketcher:
    """A fixed uniform sample of `samples` coordinates of the model's flat weight vector (all of them when the
    model is smaller), in manifest order."""

    def __init__(self, num_params: int, samples: int = SKETCH_SAMPLES, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        count = min(num_params, samples)
        self.positions = np.sort(rng.choice(num_params, size=count, replace=False)).astype(np.int64)

    def sketch(self, delta: Delta | Mapping[str, Any]) -> np.ndarray:
        delta = as_delta(delta)
        parts, offset = [], 0
        for name, shape in delta.shapes().items():
            size = int(np.prod(shape))
            lo, hi = np.searchsorted(self.positions, [offset, offset + size])
            if hi > lo:
                parts.append(delta.take(name, self.positions[lo:hi] - offset))
            offset += size
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)


def cosine_to_aggregate(sketches: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, float]:
    """Each client's cosine similarity to the weighted mean of all (on sketches)."""
    if not sketches:
        return {}
    total = sum(weights.values()) or 1.0
    aggregate = sum(weights[c] * s for c, s in sketches.items()) / total
    norm = float(np.linalg.norm(aggregate))
    out = {}
    for client, sketch in sketches.items():
        denom = norm * float(np.linalg.norm(sketch))
        out[client] = float(sketch @ aggregate / denom) if denom > 0 else 0.0
    return out


def robust_z(values: dict[str, float]) -> dict[str, float]:
    if len(values) < 3:
        return {c: 0.0 for c in values}
    arr = np.array(list(values.values()))
    median = float(np.median(arr))
    mad = float(np.median(np.abs(arr - median))) * 1.4826 or 1e-12
    return {c: (v - median) / mad for c, v in values.items()}


def fairness(client_metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean, spread and worst decile of the global model's accuracy on the clients' own data."""
    accuracies = [m["eval_accuracy_before"] for m in client_metrics.values() if "eval_accuracy_before" in m]
    if not accuracies:
        return {"client_accuracy_mean": None, "client_accuracy_std": None, "client_accuracy_p10": None,
                "client_accuracies": []}
    arr = np.array(accuracies)
    return {"client_accuracy_mean": float(arr.mean()), "client_accuracy_std": float(arr.std()),
            "client_accuracy_p10": float(np.percentile(arr, 10)), "client_accuracies": [float(a) for a in arr]}


def personalization(latest: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """The devices' A/B of personalized vs global models on their own held-out data ({client: (personalized,
    global) accuracy}, the latest each reported): mean gain, the share where personalization wins, the worst
    decile of the gain."""
    if not latest:
        return {"devices": 0, "mean_gain": None, "win_share": None, "gain_p10": None}
    gains = np.array([p - g for p, g in latest.values()])
    return {"devices": len(gains), "mean_gain": float(gains.mean()), "win_share": float(np.mean(gains > 0)),
            "gain_p10": float(np.percentile(gains, 10))}


@dataclass
class KpiTracker:
    """Running KPI state; rebuilt from the history after a restart (`replay`)."""

    settings: KpiSettings = field(default_factory=KpiSettings)
    initial_accuracy: float | None = None
    successful_client_rounds: int = 0
    bytes_total: int = 0
    losses: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outliers: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    # personalization: each device's latest (personalized, global) held-out accuracy, from its evaluation reports
    evaluations: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def evaluation(self, client: str, metrics: Mapping[str, float]) -> bool:
        """A device's evaluation report (any thread); False if it holds no personalization A/B."""
        if "personalized_accuracy" not in metrics or "global_accuracy" not in metrics:
            return False
        with self._lock:
            self.evaluations[client] = (float(metrics["personalized_accuracy"]), float(metrics["global_accuracy"]))
        return True

    def replay(self, history: Sequence[RoundRecord | dict[str, Any]]) -> None:
        for record in records(history):
            if record.complete:
                self.observe(record, record.kpis.get("cosine_similarity", {}))

    def observe(self, record: RoundRecord, cosines: dict[str, float]) -> dict[str, Any]:
        """The KPI block for a completed round's record (also advances the running state)."""
        self.successful_client_rounds += record.accepted
        self.bytes_total += record.bytes_up + record.bytes_down
        for client, m in record.client_metrics.items():
            if "eval_loss_before" in m:
                self.losses[client].append(float(m["eval_loss_before"]))
        outlier_now = self._outliers(record.update_norms, cosines)
        for client in record.update_norms:
            self.outliers[client].append(client in outlier_now)
        return {
            "successful_client_rounds": record.accepted,
            "cumulative_successful_client_rounds": self.successful_client_rounds,
            "selected": record.selected,
            "declined_by_gate": record.declined_by_gate,
            "timed_out": record.timed_out,
            "cut_off": record.cut_off,
            "rejected": record.rejected,
            "bytes_per_accuracy_point": self._bytes_per_point(record.accuracy),
            "initial_accuracy": self.initial_accuracy,
            "epsilon": record.epsilon,
            **fairness(record.client_metrics),
            "drift_flags": self.drifting(),
            "anomaly_flags": self.anomalous(),
            "round_outliers": sorted(outlier_now),
            "cosine_similarity": cosines,
            "personalization": self._personalization(record),
        }

    def _personalization(self, record: RoundRecord) -> dict[str, Any]:
        """The A/B so far; on a replay, the one the record kept (reports are not in the history)."""
        with self._lock:
            if self.evaluations:
                return personalization(self.evaluations)
        return record.kpis.get("personalization") or personalization({})

    def _bytes_per_point(self, accuracy: float | None) -> float | None:
        if accuracy is None or self.initial_accuracy is None:
            return None
        gained = (accuracy - self.initial_accuracy) * 100
        return self.bytes_total / gained if gained > 0 else None

    def _outliers(self, norms: dict[str, float], cosines: dict[str, float]) -> set[str]:
        z = robust_z(norms)
        s = self.settings
        return {c for c in norms if z.get(c, 0) > s.anomaly_z or cosines.get(c, 1.0) < s.anomaly_min_cosine}

    def drifting(self) -> list[str]:
        w, threshold = self.settings.drift_window, self.settings.drift_threshold
        return sorted(c for c, series in self.losses.items()
                      if len(series) >= 2 and series[-1] - min(series[-w:]) > threshold)

    def anomalous(self) -> list[str]:
        s = self.settings
        return sorted(c for c, seen in self.outliers.items() if sum(seen[-s.anomaly_window:]) >= s.anomaly_repeat)


def summarize(history: Sequence[RoundRecord | dict[str, Any]]) -> dict[str, Any]:
    """The run's KPI block (demo summary.json `kpis`): totals over the history plus the last round's values."""
    rounds = records(history)
    complete = [r for r in rounds if r.complete]
    last = complete[-1].kpis if complete else {}
    gates: dict[str, int] = defaultdict(int)
    rejected: dict[str, int] = defaultdict(int)
    for record in rounds:
        for gate, n in record.declined_by_gate.items():
            gates[gate] += n
        for reason, n in record.rejected.items():
            rejected[reason] += n
    keys = ("bytes_per_accuracy_point", "epsilon", "client_accuracy_mean", "client_accuracy_std",
            "client_accuracy_p10", "drift_flags", "anomaly_flags", "personalization")
    return {
        "successful_client_rounds": sum(r.accepted for r in complete),
        "selected": sum(r.selected for r in rounds),
        "declined": sum(r.declined for r in rounds),
        "declined_by_gate": dict(gates),
        "timed_out": sum(r.timed_out for r in rounds),
        "cut_off": sum(r.cut_off for r in rounds),
        "rejected": dict(rejected),
        **{k: last.get(k) for k in keys},
        "per_round": [{"round": r.round, **{k: r.kpis.get(k) for k in keys}} for r in complete],
    }
