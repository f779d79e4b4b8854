"""Downlink deltas: a device holding an earlier round's weights reaches the announced ones, or downloads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlite.agent.downlink import Held, HeldWeights, fetch
from fedlite.aggregator.config import ModelSection
from fedlite.aggregator.downlink import Downlink
from fedlite.aggregator.retained import RetainedTopics
from fedlite.demo.retained_store import RetainedStore
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, encode_delta
from fedlite.protocol.downlink import apply_delta, digest
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten, unflatten
from fedlite.protocol.messages import RoundAnnouncement
from fedlite.protocol.selection import nobody

FED, RUN, HASH = "fed", "run-1", "ab" * 32
MANIFEST = {"weights": [{"name": "dense/kernel", "shape": [64, 32]}, {"name": "dense/bias", "shape": [32]},
                        {"name": "out/kernel", "shape": [32, 10]}, {"name": "out/bias", "shape": [10]}]}


def _server(encoding: str = "int8") -> tuple[Downlink, RetainedStore]:
    broker = RetainedStore()
    retained = RetainedTopics(None, None)
    retained.attach(broker)
    return Downlink(FED, HASH, MANIFEST, retained, lambda: RUN, delta_encoding=encoding), broker


def _rounds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Weights of consecutive rounds, each a small step from the last (as training moves them)."""
    rng = np.random.default_rng(seed)
    flat = rng.normal(0, 0.3, 64 * 32 + 32 + 32 * 10 + 10).astype(np.float32)
    out = []
    for _ in range(count):
        out.append(unflatten(flat, MANIFEST))
        flat = (flat + rng.normal(0, 0.01, flat.size)).astype(np.float32)
    return out


def _announce(number: int, sent) -> RoundAnnouncement:
    return RoundAnnouncement(federation=FED, round=number, model_hash=HASH, model_topic="", weights_topic=sent.topic,
                             selection=nobody(), deadline=1e12, run=RUN, weights_digest=sent.digest,
                             delta_base=sent.delta_base)


@pytest.mark.parametrize("encoding", ["int8", "int4", "ternary-ef"])
def test_a_device_that_holds_an_earlier_round_reaches_the_announced_weights_through_the_deltas(tmp_path: Path,
                                                                                             encoding: str) -> None:
    server, broker = _server(encoding)
    weights = _rounds(6)
    device = HeldWeights(tmp_path / "weights.npz")
    first = server.publish(1, weights[0])
    got = fetch(_announce(1, first), MANIFEST, device, broker.receive, lambda reason: None)
    assert got.how == "full" and got.bytes == first.full_bytes
    for number in range(2, 4):  # the device sits out rounds 2 and 3
        server.publish(number, weights[number - 1])
    sent = server.publish(4, weights[3])
    got = fetch(_announce(4, sent), MANIFEST, device, broker.receive, lambda reason: None)
    assert got.how == "delta" and digest(got.flat) == sent.digest  # bit for bit what a newcomer downloads
    assert got.bytes < sent.full_bytes  # three deltas of random steps (incompressible) cost less than one copy
    target, start = flatten(weights[3], MANIFEST), flatten(weights[0], MANIFEST)
    relative = np.linalg.norm(got.flat - target) / np.linalg.norm(target - start)
    assert relative < {"int8": 0.01, "int4": 0.1, "ternary-ef": 0.9}[encoding]  # closer than where it started
    assert HeldWeights(tmp_path / "weights.npz").get(RUN, HASH).round == 4  # kept across a restart


def test_a_delta_costs_a_fraction_of_the_full_weights_and_the_coarser_codecs_less() -> None:
    sizes = {}
    for encoding in ("int8", "int4", "ternary-ef"):
        server, _ = _server(encoding)
        weights = _rounds(2)
        server.publish(1, weights[0])
        sent = server.publish(2, weights[1])
        sizes[encoding] = sent.delta_bytes / sent.full_bytes
    assert sizes["ternary-ef"] < 0.1 < sizes["int4"] < 0.2 < sizes["int8"] < 0.35  # random steps: little to compress


def test_a_device_that_holds_the_announced_weights_downloads_nothing(tmp_path: Path) -> None:
    server, broker = _server()
    sent = server.publish(3, _rounds(1)[0])
    device = HeldWeights(tmp_path / "weights.npz")
    fetch(_announce(3, sent), MANIFEST, device, broker.receive, lambda reason: None)
    again = fetch(_announce(3, server.publish(3, _rounds(1)[0])), MANIFEST, HeldWeights(tmp_path / "weights.npz"),
                  broker.receive, lambda reason: None)  # a retried attempt, after the agent restarted
    assert again.how == "held" and again.bytes == 0


def test_a_bad_delta_is_counted_and_the_full_weights_are_downloaded(tmp_path: Path) -> None:
    server, broker = _server()
    weights = _rounds(3)
    device = HeldWeights(tmp_path / "weights.npz")
    fetch(_announce(1, server.publish(1, weights[0])), MANIFEST, device, broker.receive, lambda reason: None)
    server.publish(2, weights[1])
    sent = server.publish(3, weights[2])
    # someone put another run's delta on round 3's topic
    broker.held[topics.delta_topic(FED, 3)] = encode_delta(
        unflatten(np.ones(2410, np.float32), MANIFEST),
        Header(kind="delta", federation=FED, round=3, model_hash=HASH, run="other"), encoding="int8", base_round=2)
    bad: list[str] = []
    got = fetch(_announce(3, sent), MANIFEST, device, broker.receive, bad.append)
    assert got.how == "full" and bad == ["run"] and digest(got.flat) == sent.digest


def test_a_device_further_behind_than_the_retained_chain_downloads_the_full_weights(tmp_path: Path) -> None:
    server, broker = _server("int8")
    weights = _rounds(12)
    device = HeldWeights(tmp_path / "weights.npz")
    fetch(_announce(1, server.publish(1, weights[0])), MANIFEST, device, broker.receive, lambda reason: None)
    for number in range(2, 12):
        sent = server.publish(number, weights[number - 1])
    assert sent.delta_base > 1  # the chain keeps less than one full copy's worth of deltas
    assert sum(1 for t in broker.held if "/delta/" in t) == len(server.chain) < 10
    got = fetch(_announce(11, sent), MANIFEST, device, broker.receive, lambda reason: None)
    assert got.how == "full" and digest(got.flat) == sent.digest
    server.finish()
    assert not [t for t in broker.held if "/delta/" in t]  # the run is over: no delta is left on the broker


def test_apply_delta_refuses_a_delta_to_another_round() -> None:
    step = unflatten(np.zeros(2410, np.float32), MANIFEST)
    frame = encode_delta(step, Header(kind="delta", federation=FED, round=4, model_hash=HASH, run=RUN),
                         encoding="int8", base_round=3)
    with pytest.raises(ProtocolError) as info:
        apply_delta(np.zeros(2410, np.float32), frame, MANIFEST, round_number=5, run=RUN, model_hash=HASH)
    assert info.value.reason == "stale"
    held = Held(RUN, HASH, 3, np.zeros(2410, np.float32))
    assert apply_delta(held.flat, frame, MANIFEST, round_number=4, run=RUN, model_hash=HASH).dtype == np.float32


def test_deltas_need_exact_full_weights() -> None:
    with pytest.raises(ValueError, match="downlink_delta needs downlink_dtype"):
        ModelSection(input_shape=[64], downlink_dtype="float16").validate()
    ModelSection(input_shape=[64], downlink_dtype="float16", downlink_delta="none").validate()
    with pytest.raises(ValueError, match="downlink_delta must be"):
        ModelSection(input_shape=[64], downlink_delta="gzip").validate()
