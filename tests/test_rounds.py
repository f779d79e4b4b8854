"""The round attempt's closing rule, and the orchestrator's wait on it (woken by admissions, no polling)."""

from __future__ import annotations

import threading
import time

import numpy as np

from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import RoundContext
from fedlite.protocol.codec import Header, Limits, encode_update
from fedlite.protocol.layout import weight_specs
from fedlite.protocol.messages import DeviceReport

MANIFEST = {"weights": [{"name": "w", "shape": [3, 2]}], "model_hash": "h"}


def _attempt(selected: list[str], k: int, quorum: int, deadline: float) -> RoundAttempt:
    context = RoundContext(federation="f", round=1, model_hash="h", manifest=MANIFEST, selected=frozenset(selected))
    return RoundAttempt(number=1, session="s", selected=frozenset(selected), deadline=time.time() + deadline,
                        clients_per_round=k, quorum=quorum, context=context, limits=Limits(),
                        aggregator=make_aggregator("mean", weight_specs(MANIFEST)))


def _update(client: str) -> bytes:
    return encode_update({"w": np.full((3, 2), 0.1, np.float32)},
                         Header(kind="update", federation="f", round=1, model_hash="h", client_id=client,
                                num_examples=10))


def test_wait_wakes_on_the_deciding_update_not_at_its_timeout():
    attempt = _attempt(["a", "b"], k=2, quorum=1, deadline=60)
    attempt.offer(_update("a"), "a")
    assert attempt.wait(timeout=0.05) is None  # undecided: the timeout returns None
    threading.Timer(0.2, lambda: attempt.offer(_update("b"), "b")).start()
    started = time.monotonic()
    assert attempt.wait(timeout=30) == "complete"
    assert time.monotonic() - started < 10  # woken by the admission, long before the 30 s timeout


def test_wait_wakes_on_the_last_answer_and_decides_at_the_deadline():
    attempt = _attempt(["a", "b"], k=2, quorum=1, deadline=60)
    attempt.offer(_update("a"), "a")
    threading.Timer(0.2, lambda: attempt.report(DeviceReport(client_id="b", round=1, kind="declined"))).start()
    assert attempt.wait(timeout=30) == "complete"  # everyone answered, the quorum holds
    late = _attempt(["a", "b"], k=2, quorum=2, deadline=0.3)
    late.offer(_update("a"), "a")
    assert late.wait(timeout=30) == "abandoned"  # the deadline decides: below the quorum
