"""The aggregator core's seams: per-worker partial sums, the blocking round wait, the orchestrator registry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedlite.aggregator import orchestrators
from fedlite.aggregator.config import load_config
from fedlite.aggregator.partials import PartialSums
from fedlite.aggregator.record import RoundRecord
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import RoundContext
from fedlite.protocol.codec import Header, Limits, encode_update
from fedlite.protocol.layout import weight_specs
from fedlite.protocol.messages import DeviceReport
from fedlite.settings import ConfigError

SPECS = [("w", (64, 8)), ("b", (8,))]


def _deltas(n: int) -> list[tuple[dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(0)
    return [({name: rng.normal(size=shape).astype(np.float32) for name, shape in SPECS}, float(i + 1))
            for i in range(n)]


@pytest.mark.parametrize("reducer", ["mean", "trimmed_mean", "median"])
def test_partial_sums_filled_by_four_threads_equal_one_aggregator(reducer: str) -> None:
    updates = _deltas(40)
    single = make_aggregator(reducer, SPECS)
    for delta, weight in updates:
        single.add(delta, weight)
    partials = PartialSums(make_aggregator(reducer, SPECS))
    start = threading.Barrier(4)

    def work(part: list[tuple[dict[str, np.ndarray], float]]) -> None:
        start.wait()
        for delta, weight in part:
            partials.add(delta, weight)

    threads = [threading.Thread(target=work, args=(updates[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert partials.workers == 4 and partials.count == 40
    expected, merged = single.result(), partials.result()
    for name, _ in SPECS:
        np.testing.assert_allclose(merged[name], expected[name], rtol=1e-6, atol=1e-7)


def _attempt(deadline: float) -> RoundAttempt:
    selected = frozenset({"a", "b"})
    context = RoundContext(federation="f", round=1, model_hash="m", manifest={}, selected=selected)
    return RoundAttempt(number=1, session="s", selected=selected, deadline=deadline, clients_per_round=2, quorum=1,
                        context=context, aggregator=make_aggregator("mean", SPECS), limits=Limits())


def test_the_round_wait_wakes_on_the_report_that_decides_it_not_on_a_poll() -> None:
    attempt = _attempt(deadline=time.time() + 60)
    assert attempt.wait(0.05) is None  # nothing happened: the wait times out undecided

    def answer() -> None:
        time.sleep(0.3)
        for client in ("a", "b"):
            attempt.report(DeviceReport(client, 1, "declined", reason="idle: busy", session="s"))

    threading.Thread(target=answer).start()
    started = time.monotonic()
    assert attempt.wait(30) == "abandoned"  # every selected device answered, none with an update
    assert time.monotonic() - started < 10  # woken by the reports, long before the 30 s timeout
    assert attempt.close().record.declined == 2


def test_the_round_wait_returns_at_the_deadline() -> None:
    attempt = _attempt(deadline=time.time() + 0.2)
    assert attempt.wait(30) == "abandoned"
    assert attempt.close().record.close_reason == "abandoned"


def _three_selected(deadline: float, clients_per_round: int) -> RoundAttempt:
    """Selected a, b, c on a one-tensor model; K = `clients_per_round`, quorum 1."""
    manifest = {"weights": [{"name": "w", "shape": [4, 2]}], "model_hash": "h"}
    selected = frozenset("abc")
    context = RoundContext(federation="f", round=1, model_hash="h", manifest=manifest, selected=selected)
    return RoundAttempt(number=1, session="s", selected=selected, deadline=deadline,
                        clients_per_round=clients_per_round, quorum=1, context=context,
                        aggregator=make_aggregator("mean", weight_specs(manifest)), limits=Limits())


def _update(attempt: RoundAttempt, client: str) -> None:
    delta = {"w": np.full((4, 2), 0.01, np.float32)}
    attempt.offer(encode_update(delta, Header(kind="update", federation="f", round=1, model_hash="h",
                                              client_id=client, num_examples=10)), client)


def test_devices_still_training_when_a_round_has_its_k_updates_are_cut_off_not_timed_out() -> None:
    attempt = _three_selected(deadline=time.time() + 60, clients_per_round=1)
    _update(attempt, "a")
    attempt.report(DeviceReport("b", 1, "declined", reason="idle: busy", session="s"))
    assert attempt.wait(5) == "complete"
    record = attempt.close().record
    assert (record.close_reason, record.accepted, record.declined) == ("quorum", 1, 1)
    assert (record.cut_off, record.timed_out) == (1, 0)  # c was still training: not needed, not late


def test_devices_silent_when_the_deadline_passes_are_timed_out() -> None:
    attempt = _three_selected(deadline=time.time() + 0.3, clients_per_round=3)
    _update(attempt, "a")
    assert attempt.wait(30) == "complete"  # the quorum (1) at the deadline
    record = attempt.close().record
    assert (record.close_reason, record.timed_out, record.cut_off) == ("deadline", 2, 0)


def test_history_written_before_cut_off_was_counted_reads_as_none_cut_off() -> None:
    old = {"round": 2, "session": "s", "status": "complete", "close_reason": "quorum", "selected": 5,
           "accepted": 3, "timed_out": 2}
    record = RoundRecord.from_dict(old)
    assert (record.timed_out, record.cut_off) == (2, 0) and record.to_dict()["cut_off"] == 0


def test_an_unknown_rounds_mode_is_a_one_line_config_error_listing_the_known(tmp_path: Path) -> None:
    assert "sync" in orchestrators.names()
    config = tmp_path / "aggregator.toml"
    config.write_text('[federation]\nname = "f"\n[rounds]\nmode = "fedbuf"\n')
    with pytest.raises(ConfigError, match="mode must be one of fedbuff, sync") as info:
        load_config(config)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown rounds mode .fedbuf.; known: fedbuff, sync"):
        orchestrators.make("fedbuf", host=None)


def test_a_round_record_survives_history_json_and_keeps_unknown_keys() -> None:
    record = RoundRecord(round=3, session="s", status="complete", close_reason="quorum", selected=5, accepted=4,
                         rejected={"stale": 2}, accuracy=0.9)
    data = record.to_dict() | {"written_by_a_later_version": 1}
    back = RoundRecord.from_dict(data)
    assert back.to_dict() == data and back.rejected_total == 2 and back.complete
