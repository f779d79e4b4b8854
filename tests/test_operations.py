"""What operators are given: the Grafana dashboard and the Prometheus alert rules under deploy/, every metric and
label they name checked against a real aggregator metrics endpoint."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from fedlite.aggregator.metrics import Metrics
from fedlite.aggregator.record import RoundRecord

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\b(fedlite_[a-z_]+)\b")
LABEL = re.compile(r'\b(status|kpi|state)\s*(!?=)\s*"([a-z_]+)"')


def _endpoint() -> dict[str, set[tuple[str, str]]]:
    """{sample name: its (label, value) pairs} scraped over HTTP from the aggregator's Metrics after a round."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics("wearables")
    metrics.serve(port)
    for status in ("complete", "failed"):
        metrics.round_closed(RoundRecord(round=1, session="s", status=status, close_reason="quorum", selected=5,
                                         accepted=3, cut_off=1, timed_out=1, duration_seconds=3.0, accuracy=0.9,
                                         loss=0.3, kpis={"epsilon": 1.5, "successful_client_rounds": 4}))
    metrics.refused("update", "stale")
    metrics.update_received(1000)
    metrics.fleet({"known": 10, "online": 8, "eligible": 5, "training": 2})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, set[tuple[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels.items())
    return samples


def _expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "fedlite-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "fedlite-alerts.yml").read_text())
    return exprs + [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_metric_and_label_value_the_dashboard_and_alerts_use_is_served_by_the_aggregator() -> None:
    samples, exprs = _endpoint(), _expressions()
    assert len(exprs) >= 18
    for expr in exprs:
        for name in METRIC.findall(expr):
            assert name in samples, f"{name} (in {expr!r}) is not on the metrics endpoint: {sorted(samples)}"
        for label, _, value in LABEL.findall(expr):
            names = [n for n in METRIC.findall(expr) if (label, value) in samples.get(n, set())]
            assert names, f"no metric in {expr!r} has {label}={value!r}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_each_alert_rule_is_complete_and_the_dashboard_is_grafana_json() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "fedlite-alerts.yml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"FedliteRoundsStalled", "FedliteHighRejectionRate", "FedliteEpsilonOverBudget",
            "FedliteDevicesStale", "FedliteDevicesTimingOut"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], rule
    dashboard = json.loads((DEPLOY / "grafana" / "fedlite-dashboard.json").read_text())
    assert dashboard["uid"] and all(p["targets"] and p["gridPos"] for p in dashboard["panels"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_devices_cut_off_and_timed_out_are_counted_apart() -> None:
    metrics = Metrics("f")
    metrics.round_closed(RoundRecord(round=1, session="s", status="complete", close_reason="quorum", selected=6,
                                     accepted=4, cut_off=2))
    metrics.round_closed(RoundRecord(round=2, session="s", status="complete", close_reason="deadline", selected=6,
                                     accepted=5, timed_out=1))
    value = metrics.registry.get_sample_value
    assert value("fedlite_devices_cut_off_total", {"federation": "f"}) == 2
    assert value("fedlite_devices_timed_out_total", {"federation": "f"}) == 1
