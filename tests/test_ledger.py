"""Every refusal is counted by kind and reason, in and between rounds, under the right Prometheus metric."""

from __future__ import annotations

import time

import pytest

from fedlite.aggregator.config import AggregatorConfig, FederationSection
from fedlite.aggregator.ledger import run_totals
from fedlite.aggregator.service import Aggregator
from fedlite.protocol import topics
from fedlite.protocol.messages import DeviceReport, DeviceStatus, to_json

FED = "ledger"


@pytest.fixture
def aggregator(tmp_path) -> Aggregator:
    """A real Aggregator, never connected: its message entry point is what a message reaches first."""
    return Aggregator(AggregatorConfig(federation=FederationSection(name=FED, state_dir=str(tmp_path / "state"))))


def _sample(aggregator: Aggregator, name: str, **labels: str) -> float:
    value = aggregator.metrics.registry.get_sample_value(name, {"federation": FED, **labels})
    return value or 0.0


def test_refusals_between_rounds_are_counted_by_kind_under_the_right_metric(aggregator: Aggregator):
    forged = DeviceStatus(client_id="dev-2", state="online", eligible=True, updated_at=time.time())
    aggregator.dispatch.on_message(topics.status_topic(FED, "dev-1"), to_json(forged))  # dev-1 writing dev-2's status
    aggregator.dispatch.on_message(topics.update_topic(FED, "dev-1"), b"an update between rounds")
    aggregator.dispatch.on_message(topics.report_topic(FED, "dev-1"), b"{not json")
    assert aggregator.inbox.drain()
    assert aggregator.ledger.totals() == {"status": {"sender": 1}, "update": {"late": 1}, "report": {"malformed": 1}}
    assert _sample(aggregator, "fedlite_messages_rejected_total", kind="status", reason="sender") == 1
    assert _sample(aggregator, "fedlite_messages_rejected_total", kind="report", reason="malformed") == 1
    assert _sample(aggregator, "fedlite_updates_rejected_total", reason="late") == 1
    assert _sample(aggregator, "fedlite_updates_rejected_total", reason="sender") == 0  # not an update
    record = {"refusals": aggregator.ledger.take()}
    assert run_totals([record, record]) == {"status": {"sender": 2}, "update": {"late": 2}, "report": {"malformed": 2}}


def test_a_deployed_report_with_an_impossible_accuracy_never_reaches_the_rollout(aggregator: Aggregator):
    reached: list[DeviceReport] = []
    aggregator.rollout.on_report = reached.append
    fake = DeviceReport(client_id="dev-1", round=3, kind="deployed",
                        metrics={"accuracy_candidate": 1e308, "accuracy_current": 0.5})
    honest = DeviceReport(client_id="dev-1", round=3, kind="deployed",
                          metrics={"accuracy_candidate": 0.91, "accuracy_current": 0.9})
    for report in (fake, honest):
        aggregator.dispatch.on_message(topics.report_topic(FED, "dev-1"), to_json(report))
    assert aggregator.inbox.drain()
    assert reached == [honest]
    assert aggregator.ledger.totals() == {"report": {"metrics": 1}}


def test_a_full_inbox_refuses_as_busy_without_blocking_the_network_thread(aggregator: Aggregator):
    from fedlite.aggregator.inbox import Inbox

    dispatch = aggregator.dispatch
    dispatch.inbox = aggregator.inbox = Inbox(dispatch._handle_item, dispatch._refuse_busy, workers=1, max_items=3,
                                              max_bytes=10_000)  # never started: drained only by drain()
    for _ in range(5):
        aggregator.dispatch.on_message(topics.update_topic(FED, "dev-1"), b"x" * 100)
    aggregator.dispatch.on_message(topics.update_topic(FED, "dev-2"), b"y" * 20_000)  # over the byte bound alone
    assert aggregator.ledger.totals() == {"update": {"busy": 3}}
    assert aggregator.inbox.drain()
    assert aggregator.ledger.totals() == {"update": {"busy": 3, "late": 3}}  # the queued ones, between rounds
