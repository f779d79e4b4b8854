"""No training example leaves a device: everything the broker relays in a 3-agent, 2-round run is recorded
by a tap and searched for every example row of every agent's local data (as float32 and float16 bytes and
as text), in the raw payloads, inside signature envelopes, in decompressed zstd bodies and in the decoded
tensors. A positive control first shows the same search finds an example planted into a payload copy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import FED, Seen, Tap, announcement, initial_model, start_federation, updates_for

from fedlite.demo.cluster import LocalFederation
from fedlite.protocol import topics
from fedlite.protocol.codec import (
    COMPACT_DICTIONARY,
    FLAG_COMPACT,
    FLAG_ZSTD,
    MAGIC,
    CodecError,
    decode,
    encode_weights,
    read_header,
)
from fedlite.protocol.layout import weight_specs
from fedlite.protocol.messages import DeviceStatus, to_json

pytestmark = pytest.mark.slow

AGENTS = ["dev-1", "dev-2", "dev-3"]
SEPARATOR = b"\xff" * 8  # no rendering of an example contains 0xff bytes: nothing matches across two payloads
WINDOW = 8  # values in the partial renderings


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory, model: Path) -> tuple[list[Seen], np.ndarray]:
    """Every message of a whole run as the broker relayed it, and every example row the agents hold."""
    tmp = tmp_path_factory.mktemp("privacy")
    with LocalFederation(tmp / "run", FED, AGENTS) as fed:
        config = start_federation(fed, tmp / "data", AGENTS, model, rounds={"total": 2})
        tap = Tap(fed, client_id="privacy-tap")  # connected before the aggregator starts: nothing is missed
        fed.start("aggregator", "aggregator", config)
        tap.wait(announcement(2, state="done"), 120, "the end of the run", fed.processes.values())
        fed.kill("aggregator")  # what is left is its final TFLite export, which stays on the server
        tap.poll(0.5)
        tap.close()
    rows = np.concatenate([np.load(tmp / "data" / f"{agent}.npz")["x"] for agent in AGENTS])
    return tap.seen, rows.astype(np.float32)


# --- what is searched, and for what -------------------------------------------------------------------


def readable_forms(message: Seen, shapes: list[tuple[str, tuple[int, ...]]] | None = None) -> Iterator[bytes]:
    """The payload as relayed, without its signature envelope, its zstd body decompressed, its decoded tensors."""
    yield message.raw
    yield message.payload
    payload = message.payload
    if payload[:3] != MAGIC or len(payload) < 5:
        return
    if payload[4] & FLAG_ZSTD:
        import zstandard

        dictionary = zstandard.ZstdCompressionDict(COMPACT_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        compact = payload[4] & FLAG_COMPACT  # a compact body is compressed with the protocol's dictionary
        decompressor = zstandard.ZstdDecompressor(dict_data=dictionary) if compact else zstandard.ZstdDecompressor()
        yield decompressor.decompressobj().decompress(payload[5:])
    try:
        decoded = decode(payload, allow_nonfinite=True, shapes=shapes)
    except CodecError:
        return
    yield json.dumps(decoded.header.__dict__).encode()
    for tensor in decoded.tensors.values():
        yield tensor.tobytes()
        if tensor.dtype == np.float32:
            yield tensor.astype(np.float16).tobytes()


def haystack(messages: Iterable[Seen]) -> bytes:
    """Every readable form of every message; updates and deltas decode against the model frame's layout (int4,
    ternary and compact frames carry no shapes of their own)."""
    messages = list(messages)
    shapes = next((weight_specs(decode(m.payload).header.extra["manifest"]) for m in messages
                   if m.kind == "model" and m.payload and "manifest" in _header_extra(m.payload)), None)
    return SEPARATOR.join(form for message in messages for form in readable_forms(message, shapes))


def _header_extra(payload: bytes) -> dict:
    try:
        return read_header(payload).extra
    except CodecError:
        return {}


def renderings(row: np.ndarray) -> dict[str, bytes]:
    """How an example could appear on the wire: whole-row float32/float16 bytes, a window of its first values
    (from its first non-zero one, so the window is not all zeros) as bytes and as text."""
    start = int(np.flatnonzero(row)[0]) if row.any() else 0
    window = row[start : start + WINDOW]
    values = [float(v) for v in window]
    return {
        "float32": row.astype("<f4").tobytes(),
        "float16": row.astype("<f2").tobytes(),
        "float32 window": window.astype("<f4").tobytes(),
        "float16 window": window.astype("<f2").tobytes(),
        "text json": json.dumps(values).encode(),
        "text compact": ",".join(f"{v:g}" for v in values).encode(),
        "text spaced": " ".join(f"{v:g}" for v in values).encode(),
    }


def find_examples(data: bytes, rows: np.ndarray) -> list[tuple[int, str]]:
    """(row index, rendering) of every example found in `data`."""
    return [(i, kind) for i, row in enumerate(rows) for kind, pattern in renderings(row).items() if pattern in data]


# --- tests ---------------------------------------------------------------------------------------------


def test_the_capture_covers_the_whole_run(capture: tuple[list[Seen], np.ndarray]) -> None:
    seen, rows = capture
    kinds = {m.kind for m in seen}
    assert {"round", "model", "weights", "updates", "status"} <= kinds
    for number in (1, 2):
        assert updates_for(seen, number) == dict.fromkeys(AGENTS, 1)
    assert len(rows) > 1000 and all(row.any() for row in rows)


def test_the_search_finds_an_example_planted_into_a_payload_copy(capture: tuple[list[Seen], np.ndarray]) -> None:
    """Positive control: the same pipeline (envelope, zstd, decode, search) finds a planted example."""
    seen, rows = capture
    victim = rows[len(rows) // 2]
    weights = next(m for m in seen if m.kind == "weights" and m.payload)
    original = decode(weights.payload)
    largest = max(original.tensors, key=lambda name: original.tensors[name].size)
    planted = dict(original.tensors)
    planted[largest] = planted[largest].copy()
    planted[largest].reshape(-1)[: victim.size] = victim  # the example as one row of a kernel
    for dtype, expected in (("float32", {"float32", "float32 window"}), ("float16", {"float16", "float16 window"})):
        payload = encode_weights(planted, original.header, dtype=dtype)  # zstd-compressed, as on the wire
        copy = Seen(weights.topic, payload, payload, weights.at)
        found = find_examples(haystack([*seen, copy]), rows[len(rows) // 2 : len(rows) // 2 + 1])
        assert expected <= {kind for _, kind in found}, (dtype, found)
    for kind in ("text json", "text compact", "text spaced"):
        status = DeviceStatus("dev-1", "online", runtime=renderings(victim)[kind].decode())
        copy = Seen(topics.status_topic(FED, "dev-1"), to_json(status), to_json(status), 0.0)
        assert (0, kind) in find_examples(haystack([copy]), victim[None, :])
    assert find_examples(haystack(seen[:50]), victim[None, :]) == []  # and not without the plant


def test_no_training_example_appears_in_anything_the_broker_relayed(capture: tuple[list[Seen], np.ndarray]) -> None:
    seen, rows = capture
    data = haystack(seen)
    assert len(data) > 100_000  # model, weights, updates and statuses, decompressed and decoded
    leaks = find_examples(data, rows)
    assert leaks == [], f"{len(leaks)} example renderings found, e.g. {leaks[:5]}"
