"""Prometheus metrics of the aggregator: rounds, participants, rejections by reason, bytes, accuracy."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from fedlite.aggregator.record import RoundRecord


class Metrics:
    def __init__(self, federation: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"federation": federation}
        self._labels = labels

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, ["federation", *extra], registry=self.registry)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            return Gauge(name, doc, ["federation", *extra], registry=self.registry)

        self.rounds = counter("fedlite_rounds", "round attempts by outcome", ("status",))
        self.updates_accepted = counter("fedlite_updates_accepted", "updates accepted")
        self.updates_rejected = counter("fedlite_updates_rejected", "updates refused, by reason", ("reason",))
        self.messages_rejected = counter("fedlite_messages_rejected", "messages of every kind refused, in or between "
                                         "rounds, by kind (update, status, report) and reason", ("kind", "reason"))
        self.retained_repairs = counter("fedlite_retained_repairs", "re-assertions of the aggregator's retained "
                                        "topics after a reconnect or an overwrite")
        self.reports = counter("fedlite_device_reports", "declines and aborts reported by devices", ("kind",))
        self.timed_out = counter("fedlite_devices_timed_out", "selected devices that had not answered when a round's "
                                 "deadline passed")
        self.cut_off = counter("fedlite_devices_cut_off", "selected devices still training when a round closed before "
                               "its deadline (it had its K updates): not needed, not a fault")
        self.bytes_in = counter("fedlite_bytes_in", "update payload bytes received")
        self.bytes_out = counter("fedlite_bytes_out", "model and weights bytes delivered to selected devices")
        self.current_round = gauge("fedlite_round", "last completed round")
        self.participants = gauge("fedlite_round_participants", "accepted updates in the last round")
        self.selected = gauge("fedlite_round_selected", "devices selected in the last round")
        self.accuracy = gauge("fedlite_global_accuracy", "global model accuracy on the server test set")
        self.loss = gauge("fedlite_global_loss", "global model loss on the server test set")
        self.devices = gauge("fedlite_devices", "devices by state", ("state",))
        self.successful_client_rounds = counter("fedlite_successful_client_rounds", "accepted client updates")
        # the last complete round's KPIs, each its own metric in its unit (`kpis.py` defines them)
        self.kpis = {
            "bytes_per_accuracy_point": gauge("fedlite_bytes_per_accuracy_point_bytes",
                                              "bytes up and down spent per point of accuracy gained so far"),
            "epsilon": gauge("fedlite_privacy_epsilon", "DP-FedAvg privacy loss epsilon so far, at [privacy] delta"),
            "client_accuracy_mean": gauge("fedlite_client_accuracy_mean_ratio",
                                          "mean of the devices' held-out accuracy of the global model (0-1)"),
            "client_accuracy_std": gauge("fedlite_client_accuracy_std_ratio",
                                         "standard deviation of the devices' held-out accuracy (0-1)"),
            "client_accuracy_p10": gauge("fedlite_client_accuracy_p10_ratio",
                                         "10th percentile of the devices' held-out accuracy (0-1)"),
        }
        self.flags = {"drift_flags": gauge("fedlite_drift_flags", "devices whose update drifts from the aggregate"),
                      "anomaly_flags": gauge("fedlite_anomaly_flags", "devices whose update looks anomalous")}
        self.duration = Histogram("fedlite_round_duration_seconds", "round duration", ["federation"],
                                  buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=self.registry)

    def serve(self, port: int, host: str = "127.0.0.1", health: Callable[[], dict[str, Any]] | None = None) -> None:
        """/metrics (and every other path: Prometheus's exposition) and /healthz (`health()` as JSON; 503 when its
        `status` is not ok), in a daemon thread."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") != "/healthz":
                return metrics(environ, start_response)
            answer = health() if health is not None else {"status": "ok"}
            body = json.dumps(answer).encode()
            start_response("200 OK" if answer.get("status") == "ok" else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]

        server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def refused(self, kind: str, reason: str) -> None:
        """One refused message (the ledger's sink): by kind and reason, and updates also by reason alone."""
        fed = self._labels["federation"]
        self.messages_rejected.labels(fed, kind, reason).inc()
        if kind == "update":
            self.updates_rejected.labels(fed, reason).inc()

    def retained_repaired(self) -> None:
        self.retained_repairs.labels(self._labels["federation"]).inc()

    def report(self, kind: str) -> None:
        self.reports.labels(self._labels["federation"], kind).inc()

    def round_closed(self, record: RoundRecord) -> None:
        fed = self._labels["federation"]
        self.rounds.labels(fed, record.status).inc()
        self.duration.labels(fed).observe(record.duration_seconds)
        self.selected.labels(fed).set(record.selected)
        self.participants.labels(fed).set(record.accepted)
        self.bytes_out.labels(fed).inc(record.bytes_down)
        self.timed_out.labels(fed).inc(record.timed_out)
        self.cut_off.labels(fed).inc(record.cut_off)
        if record.complete:
            self.current_round.labels(fed).set(record.round)
            self.updates_accepted.labels(fed).inc(record.accepted)
        if record.accuracy is not None:
            self.accuracy.labels(fed).set(record.accuracy)
            self.loss.labels(fed).set(record.loss)
        self._kpis(record.kpis)

    def _kpis(self, kpis: dict[str, Any]) -> None:
        fed = self._labels["federation"]
        self.successful_client_rounds.labels(fed).inc(kpis.get("successful_client_rounds", 0))
        for name, metric in self.kpis.items():
            if kpis.get(name) is not None:
                metric.labels(fed).set(kpis[name])
        for name, metric in self.flags.items():
            metric.labels(fed).set(len(kpis.get(name) or []))

    def update_received(self, size: int) -> None:
        self.bytes_in.labels(self._labels["federation"]).inc(size)

    def fleet(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.devices.labels(self._labels["federation"], state).set(n)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Scrapes are not log lines."""
