"""Admission of client updates: every rejection reason fires on real payloads, a good update passes."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.validation import (
    Rejected,
    RoundContext,
    ValidUpdate,
    check_metrics,
    validate_update,
)
from fedlite.protocol import PROTOCOL_VERSION
from fedlite.protocol.codec import Header, Limits, encode_update, encode_weights, update_limits

V = bytes([PROTOCOL_VERSION])

MANIFEST = {"weights": [{"name": "w", "shape": [4, 3]}, {"name": "b", "shape": [3]}]}
HASH = "ab" * 32


def _delta(scale: float = 0.01, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(0, scale, (4, 3)).astype(np.float32), "b": rng.normal(0, scale, 3).astype(np.float32)}


def _payload(delta: dict[str, np.ndarray] | None = None, **kw) -> bytes:
    values = dict(kind="update", federation="fed", round=5, model_hash=HASH, client_id="dev-1", num_examples=100,
                  metrics={"loss": 0.25})
    return encode_update(_delta() if delta is None else delta, Header(**(values | kw)))


def _ctx(**kw) -> RoundContext:
    values = dict(federation="fed", round=5, model_hash=HASH, manifest=MANIFEST,
                  selected=frozenset({"dev-1", "dev-2"}))
    return RoundContext(**(values | kw))


def _reason(payload: bytes, topic: str = "dev-1", ctx: RoundContext | None = None, limits: Limits = Limits(),
            accepted: frozenset[str] = frozenset()) -> str:
    with pytest.raises(Rejected) as info:
        validate_update(payload, topic, ctx or _ctx(), limits, accepted)
    return info.value.reason


def test_a_good_update_is_accepted_and_recorded():
    ctx, payload = _ctx(), _payload()
    update = validate_update(payload, "dev-1", ctx)
    assert update.client_id == "dev-1" and update.num_examples == 100 and update.metrics == {"loss": 0.25}
    assert update.bytes == len(payload) and not update.clipped
    assert set(update.delta) == {"w", "b"} and all(v.dtype == np.float32 for v in update.delta.values())
    original = _delta()
    np.testing.assert_allclose(update.delta["w"], original["w"], atol=0.01 * 4 / 127)
    expected_norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.delta.values()))
    assert update.norm == pytest.approx(expected_norm)
    assert ctx == _ctx()  # validation is pure: the context is unchanged


def test_duplicate_is_refused_and_first_wins():
    ctx, accepted = _ctx(), frozenset({"dev-1"})
    first = validate_update(_payload(), "dev-1", ctx)
    assert _reason(_payload(_delta(seed=9)), ctx=ctx, accepted=accepted) == "duplicate"
    assert _reason(_payload(), ctx=ctx, accepted=accepted) == "duplicate"  # a retransmission too: idempotent
    assert first.client_id == "dev-1" and validate_update(_payload(client_id="dev-2"), "dev-2", ctx,
                                                                accepted=accepted).client_id == "dev-2"


@pytest.mark.parametrize(
    ("payload_kw", "topic", "ctx_kw", "reason"),
    [
        ({"round": 4}, "dev-1", {}, "stale"),
        ({"round": 6}, "dev-1", {}, "future"),
        ({"federation": "other"}, "dev-1", {}, "federation"),
        ({"model_hash": "cd" * 32}, "dev-1", {}, "model_hash"),
        ({"client_id": "dev-2"}, "dev-1", {}, "sender"),
        ({"client_id": "dev-3"}, "dev-3", {}, "unselected"),
        ({"num_examples": 0}, "dev-1", {}, "examples"),
        ({"num_examples": 10_001}, "dev-1", {"max_examples": 10_000}, "examples"),
    ],
)
def test_header_checks(payload_kw, topic, ctx_kw, reason):
    ctx = _ctx(**ctx_kw)
    assert _reason(_payload(**payload_kw), topic, ctx) == reason


def test_wrong_tensor_names_and_shapes():
    wrong_shape = _delta() | {"b": np.zeros(4, np.float32)}
    assert _reason(_payload(wrong_shape)) == "shape"
    assert _reason(_payload({"w": _delta()["w"], "bias": np.zeros(3, np.float32)})) == "names"
    assert _reason(_payload({"w": _delta()["w"]})) == "names"


def test_kind_must_be_an_int8_update():
    weights = encode_weights(_delta(), Header(kind="weights", federation="fed", round=5, model_hash=HASH,
                                              client_id="dev-1", num_examples=100))
    assert _reason(weights) == "kind"


def test_nonfinite_update_is_refused_by_the_codec():
    delta = _delta()
    delta["w"][1, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the encoder's own cast warning
        payload = _payload(delta)
    assert _reason(payload) == "nonfinite"


def test_oversized_and_truncated_payloads():
    payload = _payload()
    assert _reason(payload, limits=Limits(max_payload_bytes=len(payload) - 1)) == "too_large"
    assert _reason(payload[:3]) == "truncated"
    assert _reason(b"garbage!") == "bad_magic"


def test_giant_scale_update_is_refused_by_magnitude():
    assert _reason(_payload(_delta(scale=1e4))) == "magnitude"
    assert validate_update(_payload(_delta(scale=1e4)), "dev-1", _ctx(max_abs_value=1e6)).norm > 1e4


def test_norm_policy_reject_and_clip():
    payload = _payload(_delta(scale=1.0))
    norm = validate_update(payload, "dev-1", _ctx()).norm
    assert _reason(payload, ctx=_ctx(max_update_norm=norm / 2, norm_policy="reject")) == "norm"
    update = validate_update(payload, "dev-1", _ctx(max_update_norm=norm / 2, norm_policy="clip"))
    assert update.clipped and update.norm == pytest.approx(norm)
    clipped_norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.delta.values()))
    assert clipped_norm == pytest.approx(norm / 2, rel=1e-5)
    relaxed = validate_update(payload, "dev-1", _ctx(max_update_norm=norm * 2, norm_policy="reject"))
    assert not relaxed.clipped


def test_context_refuses_an_unknown_norm_policy():
    with pytest.raises(ValueError, match="norm_policy"):
        _ctx(norm_policy="drop")


def test_deeply_nested_header_is_rejected_not_raised():
    body = b"[" * 100_000
    payload = b"FLT" + V + b"\x00" + struct.pack("<Q", len(body)) + body
    assert _reason(payload) in {"header", "malformed"}


def test_ledger_counts_by_kind_and_reason_and_logs_once_per_round(caplog):
    ledger, ctx, accepted = Ledger(), _ctx(), frozenset({"dev-1"})
    bad = [(_payload(), "dev-1"), (_payload(round=4), "dev-2"), (_payload(round=3, client_id="dev-2"), "dev-2"),
           (_payload(client_id="dev-9"), "dev-2")]
    with caplog.at_level("INFO", logger="fedlite.aggregator"):
        for payload, topic in bad:
            with pytest.raises(Rejected) as refused:
                validate_update(payload, topic, ctx, accepted=accepted)
            ledger.refuse("update", refused.value.reason, ctx.round, str(refused.value))
        ledger.refuse("status", "sender", None, "dev-2 wrote a status for dev-1")
    assert ledger.totals() == {"update": {"duplicate": 1, "sender": 1, "stale": 2}, "status": {"sender": 1}}
    assert ledger.count("update") == 4 and ledger.count() == 5
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 4 and "between rounds: status refused (sender)" in logged[-1]
    assert ledger.take() == ledger.totals() and ledger.take() == {}  # take() empties what goes into a record


def test_update_limits_sized_from_the_model_refuse_a_bomb_before_expanding_it():
    limits = update_limits([(4, 3), (3,)])
    assert validate_update(_payload(), "dev-1", _ctx(), limits).client_id == "dev-1"
    import zstandard

    bomb = b"FLT" + V + b"\x01" + zstandard.ZstdCompressor(level=19).compress(bytes(255 * 1024 * 1024))
    assert len(bomb) < 16 * 1024
    assert _reason(bomb, limits=limits) == "too_large"  # the declared size alone refuses it
    streamed = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(bytes(64 * 1024 * 1024))
    assert _reason(b"FLT" + V + b"\x01" + streamed, limits=limits) == "too_large"  # stopped at the model's size


def test_unselected_and_duplicate_senders_are_refused_before_decoding():
    ctx = _ctx()
    assert _reason(b"not even a frame", "dev-1", ctx, accepted=frozenset({"dev-1"})) == "duplicate"
    assert _reason(b"not even a frame", "dev-7", ctx) == "unselected"


def test_metrics_out_of_range_are_refused():
    assert _reason(_payload(metrics={"eval_accuracy_after": 1e308})) == "metrics"
    assert _reason(_payload(metrics={"train_loss": -1.0})) == "metrics"
    assert check_metrics({"accuracy_candidate": 0.9, "train_loss": 0.3, "steps": 40.0}) is None
    assert "accuracy" in check_metrics({"accuracy_candidate": 1e308})


def test_an_update_for_another_run_is_refused():
    assert _reason(_payload(run="old"), ctx=_ctx(run="new")) == "run"
    assert validate_update(_payload(run="new"), "dev-1", _ctx(run="new")).client_id == "dev-1"


_VALID = _payload()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=512).map(lambda b: b"FLT" + V + b"\x00" + b),
    st.binary(max_size=512).map(lambda b: b"FLT" + V + b"\x01" + b),
    st.tuples(st.integers(0, len(_VALID) - 1), st.integers(1, 255)).map(
        lambda t: _VALID[: t[0]] + bytes([_VALID[t[0]] ^ t[1]]) + _VALID[t[0] + 1:]),
    st.integers(0, len(_VALID)).map(lambda n: _VALID[:n]),
))
def test_random_bytes_are_always_rejected_never_raised(payload):
    try:
        update = validate_update(payload, "dev-1", _ctx())
    except Rejected as exc:
        assert exc.reason and isinstance(exc.detail, str)
    else:  # only a flip that leaves a well-formed update (e.g. inside an int8 value) may pass
        assert isinstance(update, ValidUpdate) and update.client_id == "dev-1"


def test_an_update_in_another_encoding_than_the_plans_is_refused_before_its_tensors_are_decoded():
    import json
    from dataclasses import asdict

    from safetensors.numpy import save

    meta = asdict(Header(kind="update", federation="fed", round=5, model_hash=HASH, client_id="dev-1",
                         num_examples=100)) | {"encoding": "float32", "protocol": PROTOCOL_VERSION}
    poison = {"w": np.full((4, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}  # would be "nonfinite"
    frame = b"FLT" + V + b"\x00" + save(poison, metadata={"fedlite": json.dumps(meta)})
    assert _reason(frame) == "encoding"
    assert _reason(_payload(), ctx=_ctx(encoding="float16")) == "encoding"
    assert validate_update(_payload(), "dev-1", _ctx(encoding="int8")).client_id == "dev-1"


def test_the_downlink_bytes_a_device_reports_are_read_and_a_bad_count_is_refused():
    assert validate_update(_payload(extra={"bytes_down": 24_600}), "dev-1", _ctx()).bytes_down == 24_600
    assert validate_update(_payload(), "dev-1", _ctx()).bytes_down is None  # not said: not counted
    for bad in ("24600", -1, 1.5, True, 1 << 41):
        assert _reason(_payload(extra={"bytes_down": bad})) == "header", bad
