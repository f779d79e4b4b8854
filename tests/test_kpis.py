"""KPIs: fairness arithmetic, drift and anomaly flags, sketched cosine similarity, the run summary."""

from __future__ import annotations

import numpy as np
import pytest

from fedlite.aggregator.kpis import KpiSettings, KpiTracker, Sketcher, cosine_to_aggregate, summarize
from fedlite.aggregator.record import RoundRecord


def _record(round_number: int, norms: dict[str, float], losses: dict[str, float], accuracy: float,
            accs: dict[str, float] | None = None) -> RoundRecord:
    accs = accs or {c: 0.8 for c in norms}
    return RoundRecord.from_dict({
            "round": round_number, "status": "complete", "selected": len(norms) + 1, "accepted": len(norms),
            "declined": 1, "declined_by_gate": {"idle": 1}, "timed_out": 0, "rejected": {"stale": 1},
            "bytes_up": 1000, "bytes_down": 4000, "accuracy": accuracy, "update_norms": norms,
            "client_metrics": {c: {"eval_loss_before": losses[c], "eval_accuracy_before": accs[c]} for c in norms}})


def test_sketched_cosine_tracks_the_exact_cosine():
    rng = np.random.default_rng(0)
    specs = {"w": (200, 50), "b": (50,)}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in specs.items()}
    deltas = {f"c{i}": {k: base[k] + rng.normal(scale=0.5 + i, size=s).astype(np.float32) for k, s in specs.items()}
              for i in range(4)}
    deltas["flipped"] = {k: -v for k, v in base.items()}
    weights = {c: 1.0 for c in deltas}
    sketcher = Sketcher(200 * 50 + 50)
    approx = cosine_to_aggregate({c: sketcher.sketch(d) for c, d in deltas.items()}, weights)
    flat = {c: np.concatenate([d["w"].ravel(), d["b"]]) for c, d in deltas.items()}
    mean = sum(flat.values()) / len(flat)
    for c, v in flat.items():
        exact = float(v @ mean / np.linalg.norm(v) / np.linalg.norm(mean))
        assert approx[c] == pytest.approx(exact, abs=0.12), c
    assert approx["flipped"] < 0 < approx["c0"]


def test_fairness_drift_and_bytes_per_point_arithmetic():
    tracker = KpiTracker(KpiSettings(drift_threshold=0.3, drift_window=3), initial_accuracy=0.10)
    clients = ["a", "b", "c"]
    k1 = tracker.observe(_record(1, dict.fromkeys(clients, 1.0), {"a": 1.0, "b": 1.0, "c": 1.0}, 0.50,
                                 {"a": 0.9, "b": 0.7, "c": 0.5}), {})
    assert k1["client_accuracy_mean"] == pytest.approx(0.7)
    assert k1["client_accuracy_std"] == pytest.approx(np.std([0.9, 0.7, 0.5]))
    assert k1["client_accuracy_p10"] == pytest.approx(np.percentile([0.9, 0.7, 0.5], 10))
    assert k1["bytes_per_accuracy_point"] == pytest.approx(5000 / 40)
    tracker.observe(_record(2, dict.fromkeys(clients, 1.0), {"a": 0.6, "b": 0.6, "c": 0.6}, 0.60), {})
    k3 = tracker.observe(_record(3, dict.fromkeys(clients, 1.0), {"a": 0.55, "b": 1.2, "c": 0.62}, 0.70), {})
    assert k3["drift_flags"] == ["b"]  # b's loss rose by 0.6 over its best in the window
    assert k3["bytes_per_accuracy_point"] == pytest.approx(15000 / 60)
    assert k3["cumulative_successful_client_rounds"] == 9


def test_a_repeatedly_outlying_client_is_flagged_and_a_one_off_is_not():
    tracker = KpiTracker(KpiSettings(anomaly_repeat=3, anomaly_window=5))
    honest = {f"h{i}": 1.0 + 0.05 * i for i in range(6)}
    for round_number in range(1, 6):
        norms = dict(honest, poisoner=25.0, once=25.0 if round_number == 2 else 1.1)
        cosines = {c: 0.9 for c in norms} | {"poisoner": -0.8}
        kpis = tracker.observe(_record(round_number, norms, dict.fromkeys(norms, 1.0), 0.5), cosines)
    assert kpis["anomaly_flags"] == ["poisoner"]
    assert "poisoner" in kpis["round_outliers"]


def test_summary_totals_equal_the_history():
    tracker = KpiTracker(initial_accuracy=0.1)
    history = []
    for n in range(1, 4):
        record = _record(n, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, 0.2 * n)
        record.cut_off = n - 1
        record.kpis = tracker.observe(record, {})
        assert (record.kpis["cut_off"], record.kpis["timed_out"]) == (n - 1, 0)
        history.append(record.to_dict())
    history.append({"round": 4, "status": "abandoned", "selected": 3, "accepted": 1, "declined": 2,
                    "declined_by_gate": {"charged": 2}, "timed_out": 1, "rejected": {}})  # no cut_off: older
    summary = summarize(history)
    assert (summary["cut_off"], summary["timed_out"]) == (3, 1)
    assert summary["successful_client_rounds"] == 6
    assert summary["selected"] == 12 and summary["declined"] == 5
    assert summary["declined_by_gate"] == {"idle": 3, "charged": 2}
    assert summary["rejected"] == {"stale": 3}
    assert summary["bytes_per_accuracy_point"] == history[2]["kpis"]["bytes_per_accuracy_point"]
    assert [r["round"] for r in summary["per_round"]] == [1, 2, 3]


def test_the_personalization_kpis_are_the_mean_gain_the_win_share_and_the_worst_decile() -> None:
    from fedlite.aggregator.kpis import KpiTracker, personalization

    tracker = KpiTracker()
    assert not tracker.evaluation("d0", {"accuracy": 0.5})  # not a personalization report
    for i, (p, g) in enumerate([(0.9, 0.8), (0.7, 0.75), (0.95, 0.85), (0.6, 0.6)]):
        assert tracker.evaluation(f"d{i}", {"personalized_accuracy": p, "global_accuracy": g})
    tracker.evaluation("d0", {"personalized_accuracy": 0.92, "global_accuracy": 0.8})  # the latest counts
    ab = personalization(tracker.evaluations)
    gains = [0.12, -0.05, 0.10, 0.0]
    assert ab["devices"] == 4 and ab["win_share"] == 0.5
    assert abs(ab["mean_gain"] - sum(gains) / 4) < 1e-12
    assert abs(ab["gain_p10"] - float(np.percentile(gains, 10))) < 1e-12
    assert personalization({}) == {"devices": 0, "mean_gain": None, "win_share": None, "gain_p10": None}
