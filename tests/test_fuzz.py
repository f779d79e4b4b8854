"""Hypothesis fuzzing of everything that parses bytes from the network.

1. `protocol.codec.decode`: arbitrary bytes, mutated real frames of every codec (safetensors and compact
   bodies, decoded with and without the model's layout), frames with hypothesis-built headers.
2. The aggregator's update handling: a real `RoundAttempt` in every update encoding (and the `Aggregator`'s
   message entry point) fed truncated, oversized, wrong-version, wrong-shape, NaN/Inf, giant-scale,
   out-of-range-code, wrong-encoding, replayed and cross-federation payloads among valid ones: only `Rejected`
   comes out, each refusal is counted under the expected reason, and the aggregate equals the one of the
   valid updates alone.
3. `protocol.messages.from_json` for every control message type (round, status, report, deploy).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
import typing
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlite.aggregator.config import AggregatorConfig, FederationSection
from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.service import Aggregator
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import Rejected, RoundContext
from fedlite.protocol import PROTOCOL_VERSION, codecs, topics
from fedlite.protocol.codec import (
    FLAG_COMPACT,
    FLAG_ZSTD,
    MAGIC,
    CodecError,
    Header,
    Limits,
    Message,
    decode,
    encode_model,
    encode_update,
    encode_weights,
)
from fedlite.protocol.messages import (
    CLOSE_REASONS,
    ROUND_STATES,
    CanaryTarget,
    DeployInstruction,
    DeployTarget,
    DeviceReport,
    DeviceStatus,
    MessageError,
    RoundAnnouncement,
    TrainingPlan,
    from_json,
    to_json,
)
from fedlite.protocol.selection import MAX_THRESHOLD, RULE, Selection, nobody

FED, ROUND = "fuzzfed", 3
MODEL_HASH = "ab" * 32
SPECS = [("dense/kernel", (6, 4)), ("dense/bias", (4,))]
MANIFEST = {"model_hash": MODEL_HASH, "weights": [{"name": n, "shape": list(s)} for n, s in SPECS]}
HONEST = ["dev-0", "dev-1", "dev-2", "dev-3"]
EVIL = ["evil-0", "evil-1"]  # selected, but never send a valid update: their payloads hit every later check
OUTSIDER = "mallory"  # enrolled, not selected
LIMITS = Limits(max_payload_bytes=32 * 1024, max_decoded_bytes=128 * 1024, max_tensors=64, max_header_bytes=8 * 1024)
CODEC_REASONS = {"type", "too_large", "truncated", "bad_magic", "version", "flags", "compression", "header",
                 "container", "tensor", "nonfinite", "code", "size", "layout", "names", "shape"}
UPLINK = codecs.names("update")
FIXED_SIZE = {"int8", "int8-tensor", "int4"}  # codecs whose wire size follows from the shapes alone
# hostile int8 scales overflow float32 while being dequantized; decode then refuses the Inf it made
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- building frames ----------------------------------------------------------------------------------


def header(client: str = "dev-0", **values: Any) -> Header:
    fields = {"kind": "update", "federation": FED, "round": ROUND, "model_hash": MODEL_HASH, "client_id": client,
              "num_examples": 10, "sent_at": 1.0} | values  # a fixed time: frames are reproducible
    return Header(**fields)


def update(client: str, delta: dict[str, np.ndarray], encoding: str = "int8", **values: Any) -> bytes:
    return encode_update(delta, header(client, **values), encoding=encoding)


def raw_frame(tensors: dict[str, np.ndarray], meta: dict[str, Any] | str, *, version: int = PROTOCOL_VERSION,
              flags: int = 0) -> bytes:
    """A frame built by hand: any header JSON (even one `encode_update` would never write), any tensors."""
    from safetensors.numpy import save

    text = meta if isinstance(meta, str) else json.dumps(meta)
    body = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"fedlite": text})
    if flags & FLAG_ZSTD:
        import zstandard

        body = zstandard.ZstdCompressor().compress(body)
    return MAGIC + bytes([version, flags]) + body


def header_dict(client: str = "evil-0", **values: Any) -> dict[str, Any]:
    return {**dataclasses.asdict(header(client)), "encoding": "int8", "protocol": PROTOCOL_VERSION,
            "sent_at": 1.0} | values


def quantized(delta: dict[str, np.ndarray], encoding: str = "int8") -> dict[str, np.ndarray]:
    """The wire tensors of `encoding` exactly as encode_update writes them (for a safetensors body)."""
    return codecs.get(encoding).encode(delta)[0]


def giant(tensors: dict[str, np.ndarray], name: str, encoding: str, scale: np.float32) -> dict[str, np.ndarray]:
    """`name`'s codes all at the codec's largest magnitude, times a huge finite scale."""
    out = dict(tensors) | {name + ":scale": np.full_like(tensors[name + ":scale"], scale)}
    if encoding in ("int8", "int8-tensor"):
        out[name] = np.full_like(tensors[name], 127)
    elif encoding == "int4":
        out[name + ":int4"] = np.full_like(tensors[name + ":int4"], 0x77)
    else:
        n = dict(SPECS)[name]
        count = int(np.prod(n))
        out[name + ":mask"] = np.packbits(np.ones(count, bool))
        out[name + ":sign"] = np.packbits(np.zeros(count, bool))
    return out


def bad_code(tensors: dict[str, np.ndarray], name: str, encoding: str) -> dict[str, np.ndarray]:
    """One code outside the codec's range (or a padding bit set): what its encoder never writes."""
    out = dict(tensors)
    if encoding in ("int8", "int8-tensor"):
        out[name] = tensors[name].copy()
        out[name].flat[0] = -128
    elif encoding == "int4":
        out[name + ":int4"] = tensors[name + ":int4"].copy()
        out[name + ":int4"][0] = 0x08  # the code -8
    else:  # a set padding bit in the mask of a weight whose size is no multiple of 8
        name = next(n for n, shape in SPECS if int(np.prod(shape)) % 8)
        mask = np.unpackbits(tensors[name + ":mask"])
        mask[-1] = 1
        out[name + ":mask"] = np.packbits(mask)
    return out


def zeros() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in SPECS}


def uncompressed(payload: bytes) -> bytes:
    """The same frame with its body decompressed, so mutations reach the container parser."""
    if len(payload) < 5 or not payload[4] & FLAG_ZSTD:
        return payload
    from fedlite.protocol.codec import _decompressor

    body = _decompressor(bool(payload[4] & FLAG_COMPACT)).decompressobj().decompress(payload[5:])
    return payload[:4] + bytes([payload[4] & ~FLAG_ZSTD]) + body


# --- strategies ----------------------------------------------------------------------------------------

finite = st.floats(-1.0, 1.0, allow_nan=False, width=32)


@st.composite
def deltas(draw: st.DrawFn) -> dict[str, np.ndarray]:
    return {name: np.asarray(draw(st.lists(finite, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                             np.float32).reshape(shape) for name, shape in SPECS}


@st.composite
def real_frames(draw: st.DrawFn) -> bytes:
    """A well-formed update, weights or model frame, compressed or not."""
    kind = draw(st.sampled_from(["update", "weights16", "weights32", "weights8", "model"]))
    compress = draw(st.booleans())
    if kind == "update":
        encoding, compact = draw(st.sampled_from(UPLINK)), draw(st.sampled_from([None, False, True]))
        return encode_update(draw(deltas()), header(), encoding=encoding, compress=compress, compact=compact)
    if kind == "model":
        blob = draw(st.binary(min_size=1, max_size=300))
        return encode_model(blob, header(kind="model"), compress=compress)
    dtype = {"weights16": "float16", "weights32": "float32", "weights8": "int8"}[kind]
    return encode_weights(draw(deltas()), header(kind="weights"), dtype=dtype, compress=compress)


@st.composite
def mutated(draw: st.DrawFn, frame: bytes) -> bytes:
    """Truncations, byte flips, insertions, deletions and splices of `frame`."""
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**320)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def big_int_text(digits: int) -> str:
    """A JSON integer literal with `digits` digits (Python refuses to parse more than 4300 by default)."""
    return "1" + "0" * (digits - 1)


# --- checks --------------------------------------------------------------------------------------------


def decode_or_reason(payload: bytes, limits: Limits = LIMITS, shapes: Any = None) -> Message | str:
    """decode() must either return a well-formed message or raise CodecError with a known reason."""
    try:
        message = decode(payload, limits=limits, shapes=shapes)
    except CodecError as exc:
        assert exc.reason in CODEC_REASONS, exc
        return exc.reason
    h = message.header
    assert isinstance(h.round, int) and h.round >= 0 and isinstance(h.num_examples, int) and h.num_examples >= 0
    assert h.protocol == PROTOCOL_VERSION and all(math.isfinite(v) for v in h.metrics.values())
    for value in message.tensors.values():
        assert value.dtype in (np.float32, np.uint8)
        assert value.dtype == np.uint8 or np.all(np.isfinite(value))
    return message


def assert_typed(value: Any, hint: Any) -> None:
    """A parsed control message has exactly the declared field types (recursively)."""
    if type(None) in typing.get_args(hint):  # X | None
        if value is not None:
            assert_typed(value, next(a for a in typing.get_args(hint) if a is not type(None)))
    elif dataclasses.is_dataclass(hint):
        assert isinstance(value, hint)
        hints = typing.get_type_hints(hint)
        for f in dataclasses.fields(hint):
            assert_typed(getattr(value, f.name), hints[f.name])
    elif typing.get_origin(hint) is list:
        assert isinstance(value, list)
        for item in value:
            assert_typed(item, typing.get_args(hint)[0])
    elif typing.get_origin(hint) is dict:
        assert isinstance(value, dict)
        for key, item in value.items():
            assert isinstance(key, str)
            assert_typed(item, typing.get_args(hint)[1])
    elif hint is float:
        assert type(value) is float and math.isfinite(value)
    else:
        assert type(value) is hint, (value, hint)


def parse_or_reason(cls: type, payload: bytes) -> Any:
    try:
        message = from_json(cls, payload)
    except MessageError as exc:
        assert exc.reason in {"malformed", "version", "too_large"}, exc
        return exc.reason
    assert_typed(message, cls)
    return message


# --- 1. the codec --------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512) | st.binary(max_size=64).map(lambda b: MAGIC + bytes([PROTOCOL_VERSION, 0]) + b))
def test_decode_of_arbitrary_bytes_only_raises_codec_error(payload: bytes) -> None:
    decode_or_reason(payload)


@FUZZ
@given(st.data())
def test_decode_of_mutated_real_frames_only_raises_codec_error(data: st.DataObject) -> None:
    frame = data.draw(real_frames())
    target = data.draw(mutated(data.draw(st.sampled_from([frame, uncompressed(frame)]))))
    decode_or_reason(target)
    decode_or_reason(target, shapes=SPECS)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(dataclasses.asdict(header()))) | st.text(max_size=6), json_values,
                       max_size=12),
       st.booleans(), st.sampled_from(codecs.names()))
def test_decode_with_hypothesis_built_headers_only_raises_codec_error(values: dict, base: bool, encoding: str) -> None:
    meta = (header_dict(encoding=encoding) if base else {}) | values
    tensors = {"blob": np.arange(5, dtype=np.uint8)} if encoding == "blob" else quantized(zeros(), encoding)
    frame = raw_frame(tensors, json.dumps(meta))  # json.dumps writes NaN/Infinity literals as is
    decode_or_reason(frame)
    decode_or_reason(frame, shapes=SPECS)


@pytest.mark.parametrize("text", [
    '{"kind":"update","federation":"f","round":1,"model_hash":"m","encoding":"int8","protocol":2,'
    '"metrics":{"loss":' + big_int_text(400) + "}}",  # an integer no float can hold
    '{"kind":"update","federation":"f","round":' + big_int_text(5000) + ',"model_hash":"m","encoding":"int8",'
    '"protocol":2}',  # beyond Python's int parsing limit
    '{"kind":"update","federation":"f","round":1,"model_hash":"m","encoding":"int8","protocol":2,'
    '"metrics":{"loss":NaN}}',
])
def test_decode_refuses_numbers_json_accepts_but_no_float_holds(text: str) -> None:
    assert decode_or_reason(raw_frame(quantized(zeros()), text)) in {"header", "nonfinite"}


@pytest.mark.parametrize("q", [127, -128])
def test_decode_refuses_int8_whose_finite_scale_overflows_float32(q: int) -> None:
    tensors = quantized(zeros()) | {"dense/bias": np.full(4, q, np.int8), "dense/bias:scale": np.float32([3e38])}
    assert decode_or_reason(raw_frame(tensors, header_dict())) == "nonfinite"


def test_decode_refuses_a_container_table_with_a_giant_integer() -> None:
    from safetensors.numpy import save

    body = save(quantized(zeros()), metadata={"fedlite": json.dumps(header_dict())})
    (length,) = struct.unpack("<Q", body[:8])
    table = body[8 : 8 + length].rstrip()[:-1] + b',"x":' + big_int_text(5000).encode() + b"}"
    table += b" " * (-len(table) % 8)
    payload = MAGIC + bytes([PROTOCOL_VERSION, 0]) + struct.pack("<Q", len(table)) + table + body[8 + length :]
    assert decode_or_reason(payload) == "header"


# --- 2. the aggregator's update handling ---------------------------------------------------------------


def new_aggregator(kind: str) -> Any:
    """A fresh aggregator; the mean's sums in float64."""
    return make_aggregator(kind, SPECS, **({"sum_dtype": "float64"} if kind == "mean" else {}))


def new_attempt(aggregation: str = "mean", encoding: str = "int8") -> RoundAttempt:
    context = RoundContext(federation=FED, round=ROUND, model_hash=MODEL_HASH, manifest=MANIFEST,
                           selected=frozenset(HONEST + EVIL), max_examples=10_000, encoding=encoding)
    return RoundAttempt(number=ROUND, session="fuzz", selected=frozenset(HONEST + EVIL), deadline=time.time() + 60,
                        clients_per_round=len(HONEST + EVIL), quorum=1, context=context, limits=LIMITS,
                        aggregator=new_aggregator(aggregation))


Hostile = tuple[str, bytes, set[str] | None]  # topic client, payload, the reasons it may be refused for (None: any)


@st.composite
def hostile(draw: st.DrawFn, encoding: str = "int8") -> Hostile:
    """One hostile update of a kind named in the brief, in the round's `encoding`, with the reason(s) the
    aggregator must give. A compact body has no names or shapes (its layout is the model's, which the header's
    model_hash names): wrong names and shapes are tried in named tables, and as compact bodies of the wrong size."""
    evil = draw(st.sampled_from(EVIL))
    delta = draw(deltas())
    good = update(evil, delta, encoding)
    kind = draw(st.sampled_from(["truncated", "oversized", "version", "header_version", "flags", "shape", "names",
                                 "nan", "inf", "nan_metric", "giant_scale", "federation", "stale", "future",
                                 "sender", "unselected", "model_hash", "examples", "kind", "mutated", "random_header",
                                 "garbage", "bad_code", "encoding"]))
    if kind == "truncated":
        return evil, good[: draw(st.integers(0, len(good) - 1))], CODEC_REASONS
    if kind == "oversized":
        return evil, good + bytes(LIMITS.max_payload_bytes), {"too_large"}
    if kind == "version":
        wrong = draw(st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION))
        return evil, good[:3] + bytes([wrong]) + good[4:], {"version"}
    if kind == "header_version":
        wrong = draw(st.integers().filter(lambda v: v != PROTOCOL_VERSION))
        return evil, raw_frame(quantized(delta, encoding), header_dict(evil, protocol=wrong, encoding=encoding)), {
            "version"}
    if kind == "flags":
        return evil, good[:4] + bytes([good[4] | draw(st.sampled_from([4, 8, 128]))]) + good[5:], {"flags"}
    if kind == "shape":
        name, shape = draw(st.sampled_from(SPECS))
        wrong = tuple(d + draw(st.integers(1, 3)) for d in shape)
        changed = delta | {name: np.ones(wrong, np.float32)}
        if encoding in FIXED_SIZE and draw(st.booleans()):  # a compact body one weight too long: refused by size
            frame = encode_update(changed, header(evil), encoding=encoding, compact=True)
            return evil, frame, {"size", "truncated", "code", "nonfinite"}
        frame = encode_update(changed, header(evil), encoding=encoding, compact=False)  # a named table
        return evil, frame, {"shape", "tensor", "code"}  # code: a packed tensor of the same bytes, padding set
    if kind == "names":
        name = draw(st.sampled_from([n for n, _ in SPECS]))
        changed = {k: v for k, v in delta.items() if k != name} | draw(st.sampled_from([{}, {"extra": delta[name]}]))
        return evil, encode_update(changed, header(evil), encoding=encoding, compact=False), {"names"}
    if kind in ("nan", "inf"):
        name, _ = draw(st.sampled_from(SPECS))
        bad = delta[name].copy()
        poison = np.nan if kind == "nan" else draw(st.sampled_from([-np.inf, np.inf]))
        bad.flat[draw(st.integers(0, bad.size - 1))] = poison
        with np.errstate(invalid="ignore"):
            return evil, update(evil, delta | {name: bad}, encoding), {"nonfinite"}
    if kind == "nan_metric":
        meta = header_dict(evil, metrics={"loss": draw(st.sampled_from([math.nan, math.inf, -math.inf]))},
                           encoding=encoding)
        return evil, raw_frame(quantized(delta, encoding), json.dumps(meta)), {"nonfinite"}
    if kind == "giant_scale":
        name = draw(st.sampled_from([n for n, _ in SPECS]))
        tensors = giant(quantized(delta, encoding), name, encoding, draw(st.floats(2e3, 2.0**127, width=32)))
        # inf once the largest code x s overflows
        return evil, raw_frame(tensors, header_dict(evil, encoding=encoding)), {"magnitude", "nonfinite"}
    if kind == "bad_code":
        name = draw(st.sampled_from([n for n, _ in SPECS]))
        tensors = bad_code(quantized(delta, encoding), name, encoding)
        return evil, raw_frame(tensors, header_dict(evil, encoding=encoding)), {"code"}
    if kind == "encoding":
        other = draw(st.sampled_from([e for e in UPLINK if e != encoding]))
        return evil, update(evil, delta, other), {"encoding"}
    if kind == "mutated":  # from the unselected outsider: even a mutation that still decodes is never accepted
        return OUTSIDER, draw(mutated(update(OUTSIDER, delta, encoding))), None
    if kind == "random_header":  # a hypothesis-built header, from the outsider too
        keys = st.sampled_from(sorted(header_dict())) | st.text(max_size=6)
        meta = header_dict(OUTSIDER, encoding=encoding) | draw(st.dictionaries(keys, json_values, min_size=1,
                                                                               max_size=4))
        return OUTSIDER, raw_frame(quantized(delta, encoding), json.dumps(meta)), None
    if kind == "garbage":
        return evil, draw(st.binary(max_size=64)), CODEC_REASONS
    values, reason = {
        "federation": ({"federation": draw(st.sampled_from(["other", "fuzzfed2", ""]))}, "federation"),
        "stale": ({"round": draw(st.integers(0, ROUND - 1))}, "stale"),
        "future": ({"round": draw(st.integers(ROUND + 1, 2**40))}, "future"),
        "sender": ({"client_id": draw(st.sampled_from(HONEST + [OUTSIDER, "", evil + "x"]))}, "sender"),
        "unselected": ({}, "unselected"),
        "model_hash": ({"model_hash": draw(st.sampled_from(["", "cd" * 32, MODEL_HASH[:-1]]))}, "model_hash"),
        "examples": ({"num_examples": draw(st.sampled_from([0, 10_001, 2**40]))}, "examples"),
        "kind": ({"kind": "weights"}, "kind"),
    }[kind]
    client = OUTSIDER if kind == "unselected" else evil
    if kind == "kind":
        return evil, encode_weights(delta, header(evil, **values)), {reason}
    return client, update(client, delta, encoding, **values), {reason}


@dataclasses.dataclass(frozen=True)
class Offer:
    client: str  # whose topic it arrives on (the broker-authenticated sender)
    payload: bytes
    reasons: frozenset[str] | None = None  # hostile: the reasons it may be refused for (None: any)
    valid: bool = False


@st.composite
def rounds(draw: st.DrawFn, encoding: str = "int8") -> list[Offer]:
    """Valid updates from some honest clients and hostile ones, interleaved; replays of the valid ones last."""
    clients = draw(st.lists(st.sampled_from(HONEST), min_size=1, max_size=len(HONEST), unique=True))
    valid = [Offer(c, update(c, draw(deltas()), encoding, num_examples=draw(st.integers(1, 5000))), valid=True)
             for c in clients]
    attacks = [Offer(c, p, None if r is None else frozenset(r))
               for c, p, r in draw(st.lists(hostile(encoding), max_size=12))]
    replays = [Offer(o.client, o.payload, frozenset({"duplicate"})) for o in draw(st.lists(st.sampled_from(valid),
                                                                                         max_size=3))]
    return draw(st.permutations(valid + attacks)) + replays


def reference_aggregate(aggregation: str, valid: list[Offer]) -> dict[str, np.ndarray]:
    """What the valid updates alone aggregate to, decoded and added in the same order."""
    reference = new_aggregator(aggregation)
    for offer in valid:
        message = decode(offer.payload, limits=LIMITS, shapes=SPECS)
        reference.add(message.tensors, float(message.header.num_examples))
    return reference.result()


def offer_all(attempt: RoundAttempt, sequence: list[Offer]) -> list[str | None]:
    """Offer every payload in turn; only Rejected may come out. Per offer: the refusal reason, None if accepted."""
    outcomes: list[str | None] = []
    for offer in sequence:
        try:
            attempt.offer(offer.payload, offer.client)
        except Rejected as exc:
            outcomes.append(exc.reason)
        else:
            outcomes.append(None)
    return outcomes


@pytest.mark.parametrize("encoding", UPLINK)
@FUZZ
@given(data=st.data(), aggregation=st.sampled_from(["mean", "trimmed_mean", "median"]))
def test_round_attempt_refuses_every_hostile_update_and_aggregates_only_the_valid(encoding: str, data: st.DataObject,
                                                                                 aggregation: str) -> None:
    sequence = data.draw(rounds(encoding))
    attempt = new_attempt(aggregation, encoding)
    outcomes = offer_all(attempt, sequence)

    for offer, outcome in zip(sequence, outcomes, strict=True):
        if offer.valid:
            assert outcome is None, (offer.client, outcome)
        else:
            assert outcome is not None and (offer.reasons is None or outcome in offer.reasons), (offer, outcome)
    refused = Counter(o for o in outcomes if o is not None)
    assert attempt.rejected == refused  # every refusal counted, under its reason
    valid = [o for o in sequence if o.valid]
    result, reference = attempt.aggregate(), reference_aggregate(aggregation, valid)
    assert set(result) == set(reference)
    assert all(np.array_equal(result[k], reference[k]) for k in reference)
    record = attempt.close().record
    assert record.rejected == dict(refused) and record.accepted == len(valid)


def test_replay_of_an_accepted_update_is_a_duplicate_and_changes_nothing() -> None:
    attempt = new_attempt()
    payload = update("dev-0", {n: np.full(s, 0.5, np.float32) for n, s in SPECS}, num_examples=7)
    attempt.offer(payload, "dev-0")
    before = {k: v.copy() for k, v in attempt.aggregate().items()}
    with pytest.raises(Rejected) as refused:
        attempt.offer(payload, "dev-0")
    assert refused.value.reason == "duplicate" and attempt.rejected == Counter(duplicate=1)
    assert all(np.array_equal(before[k], v) for k, v in attempt.aggregate().items())


# --- 2b. the same through the aggregator's message entry point ------------------------------------------


@pytest.fixture(scope="module")
def aggregator(tmp_path_factory: pytest.TempPathFactory) -> Aggregator:
    """A real Aggregator (never connected): its network-thread handler is what a message reaches first."""
    state = tmp_path_factory.mktemp("aggregator")
    return Aggregator(AggregatorConfig(federation=FederationSection(name=FED, state_dir=str(state))))


def status_json(client: str) -> st.SearchStrategy[bytes]:
    good = json.loads(to_json(DeviceStatus(client_id=client, state="online", eligible=True)))
    return st.one_of(
        st.dictionaries(st.sampled_from(sorted(good)), json_values).map(lambda d: json.dumps(good | d).encode()),
        st.binary(max_size=64),
        st.just(b'{"client_id":"%s","state":"online","updated_at":%s}' % (client.encode(), big_int_text(400).encode())),
    )


@FUZZ
@given(st.data())
def test_aggregator_message_handler_never_raises_and_counts_every_refusal(aggregator: Aggregator,
                                                                        data: st.DataObject) -> None:
    sequence = data.draw(rounds())
    aggregator.inbox.drain()  # nothing of an earlier example is left in the inbox
    aggregator.current = attempt = new_attempt()
    aggregator.ledger = aggregator.dispatch.ledger = Ledger()
    for offer in sequence:
        aggregator.dispatch.on_message(topics.update_topic(FED, offer.client), offer.payload)  # must not raise
    assert attempt.bytes_up == 0  # the network thread only enqueued: nothing was decoded on it
    assert aggregator.inbox.drain()
    json_refusals: Counter = Counter()
    for client in data.draw(st.lists(st.sampled_from(HONEST + [OUTSIDER]), max_size=4)):
        status = data.draw(status_json(client))
        if status:  # an empty status clears a retained one: not a message
            json_refusals[_json_refusal(DeviceStatus, client, status)] += 1
        aggregator.dispatch.on_message(topics.status_topic(FED, client), status)
        report = data.draw(st.binary(max_size=40)
                           | st.just(to_json(DeviceReport(client, ROUND, "declined", session="fuzz"))))
        json_refusals[_json_refusal(DeviceReport, client, report)] += 1
        aggregator.dispatch.on_message(topics.report_topic(FED, client), report)
    aggregator.inbox.drain()
    del json_refusals[None]
    assert sum(attempt.rejected.values()) == sum(not o.valid for o in sequence)
    totals = aggregator.ledger.totals()
    assert Counter(totals.get("update", {})) == attempt.rejected
    refused = Counter()
    for reasons in totals.values():
        refused.update(reasons)
    assert refused == attempt.rejected + json_refusals, (totals, json_refusals)


def _json_refusal(cls: type, client: str, payload: bytes) -> str | None:
    """The reason the aggregator must count for a control message on `client`'s topic (None: accepted)."""
    parsed = parse_or_reason(cls, payload)
    if isinstance(parsed, str):
        return parsed
    return "sender" if parsed.client_id != client else None


# --- 3. control messages -------------------------------------------------------------------------------

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")
numbers = st.floats(-1e12, 1e12, allow_nan=False)
selections = st.builds(Selection, rule=st.just(RULE), seed=st.binary(min_size=16, max_size=16).map(bytes.hex),
                       threshold=st.integers(0, MAX_THRESHOLD))
plans = st.builds(TrainingPlan, epochs=st.integers(1, 100), batch_size=st.integers(1, 512), learning_rate=numbers,
                  proximal_mu=numbers, stochastic_rounding=st.booleans(), max_examples=st.integers(0, 10**6))
VALID: dict[type, st.SearchStrategy[Any]] = {
    RoundAnnouncement: st.builds(RoundAnnouncement, federation=ids, round=st.integers(0, 10**9),
                                 model_hash=st.text(), model_topic=st.text(), weights_topic=st.text(),
                                 selection=selections, deadline=numbers, plan=plans, session=st.text(),
                                 state=st.sampled_from(ROUND_STATES), issued_at=numbers,
                                 accepted=st.integers(0, 10**6), reason=st.sampled_from(("", *CLOSE_REASONS))),
    DeviceStatus: st.builds(DeviceStatus, client_id=ids, state=st.sampled_from(["online", "training", "offline"]),
                            eligible=st.booleans(), failed_gates=st.dictionaries(st.text(), st.text()),
                            num_examples=st.integers(0, 10**9), runtime=st.text(), agent_version=st.text(),
                            cached_models=st.lists(st.text()), deployed_model=st.text(), updated_at=numbers),
    DeviceReport: st.builds(DeviceReport, client_id=ids, round=st.integers(0, 10**9), kind=st.text(),
                            reason=st.text(), metrics=st.dictionaries(st.text(), numbers), sent_at=numbers,
                            run=st.text(), session=st.text()),
    DeployInstruction: st.builds(
        DeployInstruction, federation=ids, deployment_id=st.text(),
        stable=st.none() | st.builds(DeployTarget, version=st.integers(0, 10**6), sha256=st.text(),
                                     model_topic=st.text()),
        canary=st.none() | st.builds(CanaryTarget, version=st.integers(0, 10**6), sha256=st.text(),
                                     model_topic=st.text(), devices=st.lists(ids)),
        issued_at=numbers),
}
MESSAGE_TYPES = list(VALID)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_from_json_round_trips_valid_messages(cls: type, data: st.DataObject) -> None:
    message = data.draw(VALID[cls])
    assert from_json(cls, to_json(message)) == message


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_from_json_of_mutated_messages_only_raises_message_error(cls: type, data: st.DataObject) -> None:
    fields = json.loads(to_json(data.draw(VALID[cls])))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(fields)) | st.text(max_size=6))
        if data.draw(st.booleans()) and key in fields:
            del fields[key]
        else:
            fields[key] = data.draw(json_values)
    text = json.dumps(fields)  # NaN / Infinity literals and giant integers included
    parse_or_reason(cls, text.encode())
    parse_or_reason(cls, text.encode()[: data.draw(st.integers(0, len(text)))])


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@FUZZ
@given(payload=st.binary(max_size=256) | json_values.map(lambda v: json.dumps(v).encode()))
def test_from_json_of_arbitrary_input_only_raises_message_error(cls: type, payload: bytes) -> None:
    parse_or_reason(cls, payload)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("literal", [big_int_text(400), big_int_text(5000), "NaN", "-Infinity", "1e999"])
def test_from_json_refuses_numbers_no_float_holds(cls: type, literal: str) -> None:
    example = {RoundAnnouncement: RoundAnnouncement("f", 1, "h", "t", "w", nobody(), 1.5),
               DeviceStatus: DeviceStatus("a", "online"), DeviceReport: DeviceReport("a", 1, "declined"),
               DeployInstruction: DeployInstruction("f", "d1", None, None)}[cls]
    fields = json.loads(to_json(example))
    float_field = next(f.name for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is float)
    fields[float_field] = "SENTINEL"
    text = json.dumps(fields).replace('"SENTINEL"', literal)
    assert parse_or_reason(cls, text.encode()) == "malformed"
