"""FedBuff: staleness-weighted buffered versions, stale updates refused, asynchronous devices, and a real run."""

from __future__ import annotations

import dataclasses
import re
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import history, write_shards

from fedlite.agent import watermark
from fedlite.aggregator.config import load_config
from fedlite.aggregator.orchestrators.fedbuff import sqrt_staleness
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import Rejected, RoundContext, validate_update
from fedlite.demo.cluster import LocalFederation, wait_for
from fedlite.protocol.codec import Header, Limits, encode_update
from fedlite.protocol.messages import RoundAnnouncement, TrainingPlan
from fedlite.protocol.selection import nobody
from fedlite.settings import ConfigError

MANIFEST = {"weights": [{"name": "w", "shape": [8, 4]}, {"name": "b", "shape": [4]}]}
SPECS = [("w", (8, 4)), ("b", (4,))]
DELTA = {"w": np.full((8, 4), 0.1, np.float32), "b": np.full(4, 0.1, np.float32)}
FED = "digits"


def _update(client: str, trained_on: int) -> bytes:
    header = Header(kind="update", federation="f", round=trained_on, model_hash="m", client_id=client,
                    num_examples=100)
    return encode_update(DELTA, header, encoding="int8")


def _context(number: int, staleness: int) -> RoundContext:
    return RoundContext(federation="f", round=number, model_hash="m", manifest=MANIFEST,
                        selected=frozenset({"fresh", "stale"}), max_staleness=staleness)


def test_a_stale_update_is_scaled_by_the_papers_weight_before_the_mean() -> None:
    attempt = RoundAttempt(number=10, session="s", selected=frozenset({"fresh", "stale"}), deadline=time.time() + 60,
                           clients_per_round=2, quorum=1, context=_context(10, 4), limits=Limits(),
                           aggregator=make_aggregator("mean", SPECS), staleness=sqrt_staleness)
    attempt.offer(_update("fresh", 10), "fresh")
    attempt.offer(_update("stale", 7), "stale")  # trained on version 7: three behind
    outcome = attempt.close()
    assert outcome.record.staleness == {"fresh": 0, "stale": 3}
    expected = 0.1 * (1.0 + 0.5) / 2  # mean of 0.1 x s(0) and 0.1 x s(3) = 0.1 x 1/2, equal examples
    np.testing.assert_allclose(outcome.aggregate["w"], expected, rtol=0.02)


def test_updates_beyond_the_buffer_or_after_the_close_wait_for_the_next_version() -> None:
    carried: deque[tuple[bytes, str]] = deque()
    selected = frozenset({"fresh", "stale", "third"})
    context = dataclasses.replace(_context(10, 4), selected=selected)
    attempt = RoundAttempt(number=10, session="s", selected=selected, deadline=time.time() + 60, clients_per_round=2,
                           quorum=1, context=context, limits=Limits(), aggregator=make_aggregator("mean", SPECS),
                           staleness=sqrt_staleness, carry_over=carried)
    assert attempt.offer(_update("fresh", 10), "fresh") is not None
    assert attempt.offer(_update("stale", 9), "stale") is not None
    assert attempt.offer(_update("third", 10), "third") is None  # the buffer is full: it goes to version 11
    attempt.close()
    assert attempt.offer(_update("fresh", 10), "fresh") is None  # closed: carried, not refused as late
    assert [client for _, client in carried] == ["third", "fresh"] and len(attempt.accepted) == 2


def test_an_update_beyond_the_staleness_bound_is_refused_as_stale_and_a_future_one_as_future() -> None:
    assert validate_update(_update("stale", 6), "stale", _context(10, 4)).round == 6
    for trained_on, reason in ((5, "stale"), (11, "future")):
        with pytest.raises(Rejected) as info:
            validate_update(_update("stale", trained_on), "stale", _context(10, 4))
        assert info.value.reason == reason
    with pytest.raises(Rejected, match="stale"):  # synchronous rounds: only the open round counts
        validate_update(_update("stale", 9), "stale", _context(10, 0))


def _announcement(number: int, staleness: int, state: str = "open") -> RoundAnnouncement:
    return RoundAnnouncement(federation=FED, round=number, model_hash="m", model_topic="", weights_topic="",
                             selection=nobody(), deadline=1e12, session=f"s{number}", state=state, run="r", epoch=1,
                             plan=TrainingPlan(max_staleness=staleness))


def test_a_device_keeps_training_on_its_version_while_later_ones_are_announced_within_the_bound() -> None:
    mine = _announcement(5, staleness=2)
    mark = watermark.advance(watermark.Watermark(), mine)
    for number, ends in ((6, False), (7, False), (8, True)):
        mark = watermark.advance(mark, _announcement(number, staleness=2))
        assert watermark.superseded(mark, mine) is ends, number
    done = watermark.advance(watermark.advance(watermark.Watermark(), mine), _announcement(6, 2, state="done"))
    assert watermark.superseded(done, mine)  # the run is over
    sync = _announcement(5, staleness=0)
    later = watermark.advance(watermark.advance(watermark.Watermark(), sync), _announcement(6, 0))
    assert watermark.superseded(later, sync)  # synchronous: a later round ends it


@pytest.mark.parametrize("tables,message", [
    ('[server]\naggregation = "median"\n', "needs server.aggregation = \"mean\""),
    ('[privacy]\nenabled = true\n', "cannot be combined with privacy.enabled"),
    ('[rounds.fedbuff]\nbuffer_size = 8\nmax_concurrency = 4\n', "max_concurrency must be >= buffer_size"),
    ('[rounds.fedbuff]\nstaleness = "hinge"\n', "staleness must be one of sqrt, constant"),
])
def test_fedbuff_settings_that_cannot_work_are_one_line_config_errors(tmp_path: Path, tables: str,
                                                                      message: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(f'[federation]\nname = "f"\n[rounds]\nmode = "fedbuff"\n{tables}')
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_a_fedbuff_run_makes_versions_of_buffered_updates_with_bounded_concurrency(tmp_path: Path) -> None:
    agents = ["dev-1", "dev-2", "dev-3", "dev-4"]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        fed.start_broker()
        for agent, shard in write_shards(tmp_path, agents, extra=60).items():
            fed.start(agent, "agent", fed.agent_config(agent, shard, agent={"status_interval_seconds": 0.5}))
        config = fed.aggregator_config(
            model={"arch": "mlp", "input_shape": [64], "classes": 10, "export_every": 0},
            rounds={"total": 8, "mode": "fedbuff", "deadline_seconds": 30.0, "wait_for_devices_seconds": 20.0,
                    "fedbuff": {"buffer_size": 2, "max_concurrency": 3, "max_staleness": 3}},
            training={"epochs": 2, "batch_size": 16, "learning_rate": 0.1},
            evaluation={"test_data": str(tmp_path / "test.npz")})
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: aggregator.popen.poll() is not None, 300, "the aggregator to finish",
                 fed.processes.values(), poll=1)
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        versions = [r for r in history(fed) if r["status"] == "complete"]
        assert [r["round"] for r in versions] == list(range(1, 9))
        assert all(1 <= r["accepted"] <= 2 for r in versions)  # a version is one buffer
        assert all(0 <= tau <= 3 for r in versions for tau in r["staleness"].values())
        accuracy = [r["accuracy"] for r in versions]
        assert accuracy[-1] > accuracy[0] + 0.1, accuracy
        training = [int(m) for m in re.findall(r"\((\d+) training\)", aggregator.log.read_text())]
        assert training and max(training) <= 3  # never more devices training than slots


def test_a_decline_for_an_earlier_session_of_the_version_still_answers_it() -> None:
    from fedlite.protocol.messages import DeviceReport

    attempt = RoundAttempt(number=3, session="s2", selected=frozenset({"a", "b"}), deadline=time.time() + 60,
                           clients_per_round=2, quorum=1, context=_context(3, 4), limits=Limits(),
                           aggregator=make_aggregator("mean", SPECS), sessions={"s1", "s2"}, close_when_answered=False)
    assert attempt.announced("s1") and attempt.announced("s2") and not attempt.announced("s0")
    assert attempt.report(DeviceReport("a", 3, "declined", reason="idle: busy", session="s1"))
    assert attempt.report(DeviceReport("b", 3, "aborted", reason="charged: on battery", session="s2"))
    assert attempt.declined == {"a": "idle: busy"} and list(attempt.aborted) == ["b"]
    assert attempt.wait(0.05) is None  # everyone answered, but only K updates or the deadline close it


def test_an_abort_for_the_session_an_earlier_version_granted_ends_the_slot_in_the_open_version() -> None:
    from fedlite.protocol.messages import DeviceReport

    attempt = RoundAttempt(number=5, session="s5", selected=frozenset({"a", "b"}), deadline=time.time() + 60,
                           clients_per_round=2, quorum=1, context=_context(5, 4), limits=Limits(),
                           aggregator=make_aggregator("mean", SPECS), sessions={"s3", "s5"}, close_when_answered=False)
    assert attempt.report(DeviceReport("a", 3, "aborted", reason="idle: busy", session="s3"))  # granted in v3
    assert not attempt.report(DeviceReport("b", 2, "aborted", reason="idle: busy", session="s2"))  # not held
    assert attempt.aborted == {"a": "idle: busy"} and attempt.answered() == {"a"}
