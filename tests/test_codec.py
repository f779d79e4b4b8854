"""The wire codec: accuracy of int8 updates, size on the wire, and refusal of anything malformed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from fedlite.protocol.codec import (
    CodecError,
    Header,
    Limits,
    decode,
    encode_model,
    encode_update,
    encode_weights,
)

SHAPES = {"dense_0/kernel": (64, 256), "dense_0/bias": (256,), "dense_1/kernel": (256, 320),
          "dense_1/bias": (320,), "dense_2/kernel": (320, 10), "dense_2/bias": (10,)}


def _header(**kw) -> Header:
    values = dict(kind="update", federation="digits", round=3, model_hash="ab" * 32, client_id="dev-1",
                  num_examples=120, metrics={"loss": 0.5})
    return Header(**(values | kw))


def _real_client_delta() -> dict[str, np.ndarray]:
    """One real local training delta: a numpy MLP trained for a few steps on a non-IID digits shard."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    x, y = x[y < 3], y[y < 3]  # a client that only sees three labels
    rng = np.random.default_rng(0)
    w = {name: (rng.normal(0, np.sqrt(2 / shape[0]), shape) if len(shape) == 2 else np.zeros(shape))
         .astype(np.float32) for name, shape in SHAPES.items()}
    start = {k: v.copy() for k, v in w.items()}
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(20):
        h1 = np.maximum(x @ w["dense_0/kernel"] + w["dense_0/bias"], 0)
        h2 = np.maximum(h1 @ w["dense_1/kernel"] + w["dense_1/bias"], 0)
        logits = h2 @ w["dense_2/kernel"] + w["dense_2/bias"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        g2 = (g @ w["dense_2/kernel"].T) * (h2 > 0)
        g1 = (g2 @ w["dense_1/kernel"].T) * (h1 > 0)
        grads = {"dense_2/kernel": h2.T @ g, "dense_2/bias": g.sum(0), "dense_1/kernel": h1.T @ g2,
                 "dense_1/bias": g2.sum(0), "dense_0/kernel": x.T @ g1, "dense_0/bias": g1.sum(0)}
        for k in w:
            w[k] -= 0.1 * grads[k]
    return {k: w[k] - start[k] for k in w}


def _rel_l2(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum(a[k] ** 2)) for k in a)
    return (num / den) ** 0.5


def test_int8_update_round_trip_error_is_under_one_percent_on_a_real_delta():
    delta = _real_client_delta()
    message = decode(encode_update(delta, _header()))
    assert set(message.tensors) == set(delta)
    assert _rel_l2(delta, message.tensors) <= 0.01
    assert message.header.num_examples == 120 and message.header.encoding == "int8"


def test_stochastic_rounding_is_unbiased_and_still_accurate():
    delta = _real_client_delta()
    rng = np.random.default_rng(1)
    decoded = [decode(encode_update(delta, _header(), stochastic=True, rng=rng)).tensors for _ in range(8)]
    mean = {k: np.mean([d[k] for d in decoded], axis=0) for k in delta}
    assert _rel_l2(delta, decoded[0]) <= 0.02
    assert _rel_l2(delta, mean) < _rel_l2(delta, decoded[0])  # averaging removes rounding noise


def test_int8_update_of_a_large_model_is_at_most_27_percent_of_float32():
    delta = _real_client_delta()
    params = sum(v.size for v in delta.values())
    assert params >= 100_000
    for compress in (False, True):
        size = len(encode_update(delta, _header(), compress=compress))
        assert size <= 0.27 * params * 4, (compress, size / (params * 4))
    assert len(encode_update(delta, _header())) < len(encode_update(delta, _header(), compress=False))


def test_weights_float16_and_float32_round_trip():
    rng = np.random.default_rng(0)
    weights = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    exact = decode(encode_weights(weights, _header(kind="weights"), dtype="float32")).tensors
    half = decode(encode_weights(weights, _header(kind="weights"), dtype="float16")).tensors
    for k in weights:
        np.testing.assert_array_equal(exact[k], weights[k])
        np.testing.assert_allclose(half[k], weights[k], rtol=1e-3, atol=1e-3)


def test_model_frame_carries_the_file_and_manifest():
    blob = bytes(range(256)) * 10
    msg = decode(encode_model(blob, _header(extra={"manifest": {"classes": 10}})))
    assert msg.header.kind == "model" and msg.tensors["blob"].tobytes() == blob
    assert msg.header.extra["manifest"]["classes"] == 10


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: p[:3], "truncated"),
        (lambda p: b"XYZ" + p[3:], "bad_magic"),
        (lambda p: p[:3] + bytes([9]) + p[4:], "version"),
        (lambda p: p[:4] + bytes([0x80]) + p[5:], "flags"),
        (lambda p: p[:5] + b"\x00" * 8 + p[13:], "compression"),
    ],
)
def test_malformed_frames_get_a_reason(mutate, reason):
    payload = encode_update({"w": np.ones((4, 4), np.float32)}, _header())
    with pytest.raises(CodecError) as err:
        decode(mutate(payload))
    assert err.value.reason == reason


def test_nan_is_refused_and_oversize_is_refused_before_parsing():
    nan = encode_weights({"w": np.array([1.0, np.nan], np.float32)}, _header(kind="weights"))
    with pytest.raises(CodecError, match="nonfinite"):
        decode(nan)
    big = encode_weights({"w": np.zeros(100_000, np.float32)}, _header(kind="weights"), compress=False)
    with pytest.raises(CodecError) as err:
        decode(big, limits=Limits(max_payload_bytes=10_000))
    assert err.value.reason == "too_large"
    zipped = encode_weights({"w": np.zeros(1_000_000, np.float32)}, _header(kind="weights"))
    assert len(zipped) < 10_000  # a zip bomb: tiny on the wire, large when inflated
    with pytest.raises(CodecError, match="too_large"):
        decode(zipped, limits=Limits(max_decoded_bytes=100_000))


def test_header_with_wrong_types_or_unknown_fields_is_refused():
    from safetensors.numpy import save

    for bad in ['{"kind": "update"}', '{"kind":"update","federation":"f","round":"1","model_hash":"h",'
                '"encoding":"int8","protocol":2}', "[1, 2]", "not json"]:
        body = save({"w": np.zeros(2, np.float32)}, metadata={"fedlite": bad})
        with pytest.raises(CodecError, match="header"):
            decode(b"FLT\x02\x00" + body)


_payload = encode_update({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, np.float32)},
                         _header())
_raw = encode_update({"a": np.arange(12, dtype=np.float32).reshape(3, 4)}, _header(), compress=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_garbage_bytes_always_raise_codec_error(data):
    for candidate in (data, b"FLT\x02\x00" + data, b"FLT\x02\x01" + data):
        with pytest.raises(CodecError):
            decode(candidate)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(_payload) - 1))
def test_truncated_payloads_always_raise_codec_error(cut):
    with pytest.raises(CodecError):
        decode(_payload[:cut])


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=5, max_value=len(_raw) - 1), st.integers(min_value=1, max_value=255))
def test_flipped_bytes_raise_or_decode_to_the_declared_shapes(position, xor):
    """A corrupted byte either is refused or yields finite float32 tensors, never a crash."""
    mutated = bytearray(_raw)
    mutated[position] ^= xor
    try:
        message = decode(bytes(mutated))
    except CodecError:
        return
    assert all(t.dtype == np.float32 and np.all(np.isfinite(t)) for t in message.tensors.values())


# --- the codec registry ---------------------------------------------------------------------------------

_GOLDEN_DELTA_SEED = 42


def _golden_delta() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_GOLDEN_DELTA_SEED)
    return {"dense_0/kernel": rng.normal(0, 0.01, (8, 5)).astype(np.float32),
            "dense_0/bias": rng.normal(0, 0.01, 5).astype(np.float32),
            "dense_1/kernel": rng.normal(0, 0.01, (5, 3)).astype(np.float32), "dense_1/bias": np.zeros(3, np.float32)}


def test_int8_through_the_registry_is_bit_identical_to_the_frames_before_it():
    """sha256 of frames the encoder wrote before codecs had a registry (safetensors 0.x, zstandard 0.25 here)."""
    import hashlib

    header = _header(federation="f", client_id="dev-1", num_examples=12, metrics={"train_loss": 0.5}, sent_at=1.5,
                     run="cd" * 16)
    frames = {
        "zstd": encode_update(_golden_delta(), header),
        "raw": encode_update(_golden_delta(), header, compress=False),
        "stochastic": encode_update(_golden_delta(), header, stochastic=True, rng=np.random.default_rng(7)),
        "named": encode_update(_golden_delta(), header, encoding="int8"),
    }
    digests = {name: hashlib.sha256(frame).hexdigest() for name, frame in frames.items()}
    assert digests == {"zstd": "7b7c2731d224d7d631af78fb4915dfe8040518c8aa04412be97a2912b992e9a1",
                       "raw": "0b8adb949167afa2b0034dfbbadd65e6a49e0078035acf6ce154ecf3222ad84c",
                       "stochastic": "9b8559f23d9a602df714532172613561b46ab2f03c2b6a6d8115046c3a6fdf56",
                       "named": "7b7c2731d224d7d631af78fb4915dfe8040518c8aa04412be97a2912b992e9a1"}


def test_the_registry_names_int8_first_and_refuses_unknown_encodings():
    from fedlite.protocol import codecs

    assert codecs.names("update")[0] == "int8" and codecs.get("int8").name == "int8"
    assert {"float16", "float32"} <= set(codecs.names("weights")) and codecs.names("model") == ["blob"]
    with pytest.raises(CodecError) as err:
        codecs.get("int3")
    assert err.value.reason == "header"
    with pytest.raises(ValueError, match=r"^encoding must be one of int8(, [a-z0-9-]+)*, not 'int3'$"):
        codecs.check_encoding("int3")
    with pytest.raises(ValueError, match="does not encode updates"):
        encode_update(_golden_delta(), _header(), encoding="float32")


def _raw_frame(tensors: dict[str, np.ndarray], **header_values) -> bytes:
    import json
    from dataclasses import asdict

    from safetensors.numpy import save

    meta = asdict(_header()) | {"encoding": "int8", "protocol": 2} | header_values
    return b"FLT\x02\x00" + save(tensors, metadata={"fedlite": json.dumps(meta)})


def test_a_frame_in_an_encoding_no_codec_has_is_refused_as_header():
    with pytest.raises(CodecError) as err:
        decode(_raw_frame({"w": np.zeros(3, np.int8), "w:scale": np.ones(1, np.float32)}, encoding="int3"))
    assert err.value.reason == "header"


def test_int8_refuses_the_code_minus_128_its_encoder_never_writes():
    frame = _raw_frame({"w": np.array([1, -128, 3], np.int8), "w:scale": np.ones(1, np.float32)})
    with pytest.raises(CodecError) as err:
        decode(frame)
    assert err.value.reason == "code"
    assert decode(_raw_frame({"w": np.array([1, -127, 3], np.int8), "w:scale": np.ones(1, np.float32)})).tensors[
        "w"].tolist() == [1.0, -127.0, 3.0]


def test_a_table_is_checked_against_the_model_before_any_tensor_is_read():
    """Names, shapes and scale counts are compared with the model's layout from the table alone, and a table
    that claims more data than the body holds is refused before anything is allocated for it."""
    import tracemalloc

    good = {"w": np.zeros((4, 3), np.int8), "w:scale": np.ones(3, np.float32)}
    layout = [("w", (4, 3))]
    assert decode(_raw_frame(good), shapes=layout).tensors["w"].shape == (4, 3)
    cases = {"names": ([("v", (4, 3))], good), "shape": ([("w", (3, 4))], good),
             "tensor": (layout, {"w": np.zeros((4, 3), np.int8), "w:scale": np.ones(4, np.float32)})}
    for reason, (shapes, tensors) in cases.items():
        with pytest.raises(CodecError) as err:
            decode(_raw_frame(tensors), shapes=shapes)
        assert err.value.reason == reason, reason
    import json
    import struct
    from dataclasses import asdict

    meta = json.dumps(asdict(_header()) | {"encoding": "int8", "protocol": 2})
    table = json.dumps({"__metadata__": {"fedlite": meta},
                        "w": {"dtype": "I8", "shape": [4_000_000_000, 3], "data_offsets": [0, 12_000_000_000]},
                        "w:scale": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}).encode()
    huge = b"FLT\x02\x00" + struct.pack("<Q", len(table)) + table + bytes(24)
    tracemalloc.start()
    with pytest.raises(CodecError) as err:
        decode(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.reason == "container" and peak < 1_000_000


# --- every update codec -------------------------------------------------------------------------------------

from fedlite.protocol import codecs  # noqa: E402
from fedlite.protocol.codec import (  # noqa: E402
    COMPACT_DICTIONARY,
    FLAG_COMPACT,
    FLAG_ZSTD,
    encode_update_with_residual,
    update_limits,
)

UPLINK = codecs.names("update")
LAYOUT = list(SHAPES.items())
SMALL = [("k", (6, 5)), ("b", (5,)), ("odd", (7,)), ("empty", (0,))]


def _small_delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in SMALL}


def _bytes_of(encoding: str, delta: dict[str, np.ndarray], **kw) -> int:
    return len(encode_update(delta, _header(), encoding=encoding, **kw))


@pytest.mark.parametrize("encoding", UPLINK)
@pytest.mark.parametrize("compact", [None, False, True])
def test_every_codec_round_trips_in_both_bodies_with_its_own_error_bound(encoding: str, compact: bool | None):
    delta = _real_client_delta()
    payload = encode_update(delta, _header(), encoding=encoding, compact=compact)
    message = decode(payload, shapes=LAYOUT)
    assert message.header.encoding == encoding and list(message.tensors) == list(SHAPES)
    assert all(message.tensors[k].shape == delta[k].shape and message.tensors[k].dtype == np.float32 for k in delta)
    bound = {"int8": 0.01, "int8-tensor": 0.03, "int4": 0.2, "ternary-ef": 1.0}[encoding]  # ternary: EF makes up
    assert _rel_l2(delta, message.tensors) <= bound
    assert bool(payload[4] & FLAG_COMPACT) == (codecs.get(encoding).compact if compact is None else compact)


def test_bytes_shrink_codec_by_codec_on_a_real_delta():
    delta = _real_client_delta()
    float32 = 4 * sum(v.size for v in delta.values())
    sizes = {encoding: _bytes_of(encoding, delta) for encoding in UPLINK}
    ratios = {encoding: size / float32 for encoding, size in sizes.items()}
    assert ratios["int8"] < 0.27 and ratios["int8-tensor"] < 0.15 and ratios["int4"] < 0.09, ratios
    assert ratios["ternary-ef"] < 0.01 and sizes["ternary-ef"] < sizes["int4"] < sizes["int8-tensor"] < sizes["int8"]


def test_ternary_error_feedback_sends_everything_over_the_rounds():
    """What an update leaves out is its residual, exactly; the residuals keep the running sum of what was sent
    within one residual of the running sum of the deltas, so nothing is lost, only delayed."""
    residual: dict[str, np.ndarray] | None = None
    sent = {name: np.zeros(shape, np.float64) for name, shape in SMALL}
    owed = {name: np.zeros(shape, np.float64) for name, shape in SMALL}
    for seed in range(30):
        delta = _small_delta(seed)
        start = {k: delta[k] + (0 if residual is None else residual[k]) for k in delta}
        payload, residual = encode_update_with_residual(delta, _header(), encoding="ternary-ef", residual=residual)
        got = decode(payload, shapes=SMALL).tensors
        for k in delta:
            np.testing.assert_allclose(got[k] + residual[k], start[k], atol=1e-7)
            scale = float(np.max(np.abs(start[k]))) if start[k].size else 0.0
            assert set(np.unique(got[k]).tolist()) <= {-scale, 0.0, scale}  # ternary x one scale per tensor
            sent[k] += got[k]
            owed[k] += delta[k]
    for k in owed:
        np.testing.assert_allclose(sent[k] + residual[k], owed[k], atol=1e-5)
        assert np.linalg.norm(residual[k]) < 0.2 * np.linalg.norm(owed[k]) or owed[k].size == 0


@pytest.mark.parametrize("encoding", ["int8-tensor", "int4"])
def test_stochastic_rounding_is_unbiased_in_the_scaled_codecs(encoding: str):
    delta = _real_client_delta()
    rng = np.random.default_rng(3)
    decoded = [decode(encode_update(delta, _header(), encoding=encoding, stochastic=True, rng=rng),
                      shapes=LAYOUT).tensors for _ in range(16)]
    mean = {k: np.mean([d[k] for d in decoded], axis=0) for k in delta}
    deterministic = decode(encode_update(delta, _header(), encoding=encoding), shapes=LAYOUT).tensors
    assert _rel_l2(delta, mean) < 0.6 * _rel_l2(delta, decoded[0])
    assert _rel_l2(delta, mean) < _rel_l2(delta, deterministic)


def test_limits_follow_the_codec_and_a_genuine_update_fits_them():
    shapes = [shape for _, shape in LAYOUT]
    limits = {encoding: update_limits(shapes, encoding=encoding) for encoding in UPLINK}
    decoded = {encoding: limit.max_decoded_bytes for encoding, limit in limits.items()}
    assert decoded["ternary-ef"] < decoded["int4"] < decoded["int8-tensor"] <= decoded["int8"]
    delta = _real_client_delta()
    for encoding in UPLINK:
        assert decode(encode_update(delta, _header(), encoding=encoding), limits=limits[encoding], shapes=LAYOUT)


# hand-built compact frames: each weight's parts in order, little-endian


def _compact(parts: list[bytes], encoding: str, compress: bool = True, **header_values) -> bytes:
    import json
    import struct
    from dataclasses import asdict

    import zstandard

    text = json.dumps(asdict(_header()) | {"encoding": encoding, "protocol": 2} | header_values).encode()
    body = struct.pack("<I", len(text)) + text + b"".join(parts)
    flags = FLAG_COMPACT
    if compress:
        dictionary = zstandard.ZstdCompressionDict(COMPACT_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        body = zstandard.ZstdCompressor(level=3, dict_data=dictionary).compress(body)
        flags |= FLAG_ZSTD
    return b"FLT\x02" + bytes([flags]) + body


def _f32(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


ONE = [("w", (3,))]  # one weight of three values


def test_a_hand_built_compact_frame_decodes_as_the_readme_says():
    int4 = _compact([bytes([0x7F, 0x01]), _f32(0.5)], "int4")  # codes -1, 7 | 1, (padding 0)
    assert decode(int4, shapes=ONE).tensors["w"].tolist() == [-0.5, 3.5, 0.5]
    ternary = _compact([_f32(2.0), bytes([0b10100000]), bytes([0b10000000])], "ternary-ef")  # codes -1, 0, +1
    assert decode(ternary, shapes=ONE).tensors["w"].tolist() == [-2.0, 0.0, 2.0]
    int8 = _compact([np.array([-127, 0, 5], np.int8).tobytes(), _f32(0.25)], "int8-tensor", compress=False)
    assert decode(int8, shapes=ONE).tensors["w"].tolist() == [-31.75, 0.0, 1.25]


@pytest.mark.parametrize(
    "encoding, parts, reason",
    [
        ("int4", [bytes([0x18, 0x00]), _f32(1.0)], "code"),  # the code -8
        ("int4", [bytes([0x11, 0x10]), _f32(1.0)], "code"),  # a padding nibble that is not 0
        ("int4", [bytes([0x11, 0x01]), _f32(np.nan)], "nonfinite"),
        ("int4", [bytes([0x11, 0x01]), _f32(-1.0)], "nonfinite"),
        ("int4", [bytes([0x11, 0x01]), _f32(5e37)], "nonfinite"),  # 8 x scale overflows float32
        ("int4", [bytes([0x11, 0x01])], "truncated"),
        ("int4", [bytes([0x11, 0x01]), _f32(1.0), b"\x00"], "size"),
        ("int8-tensor", [np.array([1, -128, 0], np.int8).tobytes(), _f32(1.0)], "code"),
        ("int8-tensor", [np.array([1, 2, 0], np.int8).tobytes(), _f32(np.inf)], "nonfinite"),
        ("ternary-ef", [_f32(1.0), bytes([0b10110000]), bytes([0])], "code"),  # a mask padding bit
        ("ternary-ef", [_f32(1.0), bytes([0b10100000]), bytes([0b00100000])], "code"),  # a sign padding bit
        ("ternary-ef", [_f32(1.0), bytes([0b11100000])], "truncated"),  # three non-zeros, no sign byte
        ("ternary-ef", [_f32(1.0), bytes([0b00000000]), bytes([0])], "size"),  # a sign byte for no non-zero
        ("ternary-ef", [_f32(np.nan), bytes([0b10000000]), bytes([0])], "nonfinite"),
    ],
)
def test_malformed_compact_payloads_are_refused_with_their_reason(encoding: str, parts: list[bytes], reason: str):
    with pytest.raises(CodecError) as err:
        decode(_compact(parts, encoding), shapes=ONE)
    assert err.value.reason == reason, err.value


def test_frames_that_need_the_model_refuse_to_decode_without_it():
    for encoding, compact in (("int4", True), ("int4", False), ("ternary-ef", False), ("int8-tensor", True)):
        payload = encode_update(_small_delta(), _header(), encoding=encoding, compact=compact)
        with pytest.raises(CodecError) as err:
            decode(payload)
        assert err.value.reason == "layout"
        assert decode(payload, shapes=SMALL).header.encoding == encoding
    assert set(decode(encode_update(_small_delta(), _header(), encoding="int8-tensor", compact=False)).tensors) == {
        name for name, _ in SMALL}


def test_table_bodies_of_packed_codecs_are_checked_against_the_model():
    delta = _small_delta()
    for encoding in ("int4", "ternary-ef"):
        payload = encode_update(delta, _header(), encoding=encoding, compact=False)
        for shapes, reason in (([("k", (6, 6)), *SMALL[1:]], "tensor"), (SMALL[1:], "names")):
            with pytest.raises(CodecError) as err:
                decode(payload, shapes=shapes)
            assert err.value.reason == reason, (encoding, reason, err.value)


def test_a_compact_frame_is_much_smaller_than_safetensors_for_a_small_model():
    """For the demo's 6,570-weight MLP the safetensors table costs more than ternary codes: the compact body
    (no table, the header compressed against COMPACT_DICTIONARY) removes most of it."""
    rng = np.random.default_rng(0)
    delta = {name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in
             [("dense_0/kernel", (64, 64)), ("dense_0/bias", (64,)), ("dense_1/kernel", (64, 32)),
              ("dense_1/bias", (32,)), ("dense_2/kernel", (32, 10)), ("dense_2/bias", (10,))]}
    header = _header(model_hash="3f" * 32, run="9c" * 16, metrics={"train_loss": 0.41, "steps": 8.0,
                                                                   "eval_accuracy_after": 0.87})
    compact = len(encode_update(delta, header, encoding="ternary-ef"))
    table = len(encode_update(delta, header, encoding="ternary-ef", compact=False))
    assert compact < 0.7 * table, (compact, table)


def test_read_header_reads_a_compact_frames_header_without_the_model_layout_and_refuses_what_is_not_a_frame():
    from fedlite.protocol.codec import CodecError, Header, decode, encode_update, read_header

    delta = {"w": np.full((8, 4), 0.1, np.float32), "b": np.full(4, -0.2, np.float32)}
    header = Header(kind="update", federation="f", round=7, model_hash="m", client_id="pi-1", num_examples=12,
                    run="r1")
    frame = encode_update(delta, header, encoding="int4")
    with pytest.raises(CodecError) as info:
        decode(frame)  # a compact body's tensors decode only against the layout
    assert info.value.reason == "layout"
    read = read_header(frame)
    assert (read.kind, read.round, read.client_id, read.num_examples, read.encoding, read.run) == (
        "update", 7, "pi-1", 12, "int4", "r1")
    for bad, reason in [(frame[:3], "truncated"), (b"XYZ" + frame[3:], "bad_magic")]:
        with pytest.raises(CodecError) as info:
            read_header(bad)
        assert info.value.reason == reason
