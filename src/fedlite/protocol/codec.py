"""Binary wire format for updates, weights and models: a versioned frame around a safetensors body.

Frame layout (all messages that carry tensors):

    b"FLT" | version: u8 | flags: u8 | body

`version` is PROTOCOL_VERSION; flag bit 0 means the body is zstd-compressed; other bits must be 0.
The body is a safetensors file whose ``__metadata__["fedlite"]`` is the JSON header (see `Header`).
Tensor encodings, named in the header's ``encoding``:

- ``int8``: each weight ``W`` travels as int8 ``W`` plus float32 ``W:scale``; for tensors of rank >= 2
  the scale is per channel (the last axis), otherwise one scale; value = int8 * scale (symmetric, no
  zero point). Optional stochastic rounding makes the quantization unbiased.
- ``float16`` / ``float32``: each weight travels as is (downlink weights).
- ``blob``: one uint8 tensor ``blob`` (a .tflite model file).

Anything that is not exactly this raises `CodecError` with a short reason tag; nothing is pickled.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedlite.protocol import PROTOCOL_VERSION
from fedlite.protocol.errors import ProtocolError

MAGIC = b"FLT"
FLAG_ZSTD = 0x01
KINDS = ("update", "weights", "model")
ENCODINGS = ("int8", "float16", "float32", "blob")
SCALE_SUFFIX = ":scale"
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
_ST_DTYPES = {"I8": np.int8, "F16": np.float16, "F32": np.float32, "U8": np.uint8}


class CodecError(ProtocolError):
    """A payload that is not a well-formed fedlite frame."""


@dataclass(frozen=True)
class Limits:
    """Hard bounds applied before any allocation driven by the payload."""

    max_payload_bytes: int = 64 * 1024 * 1024
    max_decoded_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 4096
    max_header_bytes: int = 1024 * 1024


# Room for an update's JSON header (metrics, ids, hashes) in its safetensors table.
HEADER_ALLOWANCE = 16 * 1024


def update_limits(shapes: list[tuple[int, ...]], base: Limits = Limits()) -> Limits:
    """Limits sized from a model: an int8 update of these tensor shapes, plus room for its header.

    The decoded body of a genuine update is its safetensors table and header (bounded by `HEADER_ALLOWANCE`
    plus a little per tensor), one byte per weight and four per scale; anything that expands beyond that is
    refused while decompressing, so a decompression bomb costs O(model), not O(what it claims).
    """
    weights = sum(math.prod(shape) for shape in shapes)
    scales = sum(shape[-1] if len(shape) >= 2 else 1 for shape in shapes)
    table = HEADER_ALLOWANCE + 256 * 2 * len(shapes)
    decoded = 8 + table + weights + 4 * scales
    payload = 5 + decoded + decoded // 128 + 1024  # zstd's worst case for incompressible input, and the prefix
    return Limits(max_payload_bytes=min(base.max_payload_bytes, payload),
                  max_decoded_bytes=min(base.max_decoded_bytes, decoded),
                  max_tensors=min(base.max_tensors, 2 * len(shapes) + 8),  # slack: extra names refused by name
                  max_header_bytes=min(base.max_header_bytes, table))


@dataclass
class Header:
    """What a frame says about itself; travels as JSON in the safetensors metadata."""

    kind: str
    federation: str
    round: int
    model_hash: str
    client_id: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    encoding: str = ""
    protocol: int = PROTOCOL_VERSION
    sent_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    run: str = ""  # the aggregator run an update answers (from the round announcement); "" in broadcasts


@dataclass
class Message:
    header: Header
    tensors: dict[str, np.ndarray]


# --- quantization -------------------------------------------------------------------------------


def quantize_int8(
    x: np.ndarray, *, stochastic: bool = False, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: per channel (last axis) for rank >= 2, one scale otherwise."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim >= 2:
        max_abs = np.max(np.abs(x.reshape(-1, x.shape[-1])), axis=0)
    else:
        max_abs = np.array([np.max(np.abs(x)) if x.size else 0.0], dtype=np.float32)
    scale = (max_abs / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    scaled = x / safe if x.ndim >= 2 else x / safe[0]
    if stochastic:
        rng = rng or np.random.default_rng()
        q = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    else:
        q = np.rint(scaled)
    with np.errstate(invalid="ignore"):  # NaN input casts to garbage here; decode refuses its NaN scale
        return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    out = q.astype(np.float32)
    out *= scale if q.ndim >= 2 else scale[0]  # in place: one float32 copy of the tensor, no temporary
    return out


# --- encoding -----------------------------------------------------------------------------------


def encode_update(
    delta: dict[str, np.ndarray],
    header: Header,
    *,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
    compress: bool = True,
) -> bytes:
    """An int8-quantized model update (uplink)."""
    tensors: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        q, scale = quantize_int8(value, stochastic=stochastic, rng=rng)
        tensors[name] = q
        tensors[name + SCALE_SUFFIX] = scale
    return _encode(tensors, _with(header, "update", "int8"), compress)


def encode_weights(
    weights: dict[str, np.ndarray], header: Header, *, dtype: str = "float32", compress: bool = True
) -> bytes:
    """Global weights (downlink) as float32 or float16."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"weights dtype must be float16 or float32, not {dtype!r}")
    tensors = {name: np.asarray(value).astype(dtype) for name, value in weights.items()}
    return _encode(tensors, _with(header, "weights", dtype), compress)


def encode_model(model_file: bytes, header: Header, *, compress: bool = True) -> bytes:
    """A .tflite model file; the manifest goes in ``header.extra["manifest"]``."""
    blob = np.frombuffer(model_file, dtype=np.uint8)
    return _encode({"blob": blob}, _with(header, "model", "blob"), compress)


def _with(header: Header, kind: str, encoding: str) -> Header:
    values = asdict(header)
    values.update(kind=kind, encoding=encoding, protocol=PROTOCOL_VERSION, sent_at=header.sent_at or time.time())
    return Header(**values)


def _encode(tensors: dict[str, np.ndarray], header: Header, compress: bool) -> bytes:
    from safetensors.numpy import save

    for name in tensors:
        if not _TENSOR_NAME.match(name.removesuffix(SCALE_SUFFIX)):
            raise ValueError(f"tensor name {name!r} is not allowed on the wire")
    body = save(
        {name: np.ascontiguousarray(value) for name, value in tensors.items()},
        metadata={"fedlite": json.dumps(asdict(header), separators=(",", ":"), allow_nan=False)},
    )
    flags = 0
    if compress:
        import zstandard

        body = zstandard.ZstdCompressor(level=3).compress(body)
        flags |= FLAG_ZSTD
    return MAGIC + bytes([PROTOCOL_VERSION, flags]) + body


# --- decoding -----------------------------------------------------------------------------------


def decode(payload: bytes, *, limits: Limits = Limits(), allow_nonfinite: bool = False) -> Message:
    """Parse and check a frame; tensors come back as float32 (int8 dequantized) or uint8 blobs."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError("type", f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > limits.max_payload_bytes:
        raise CodecError("too_large", f"payload of {len(payload)} B exceeds {limits.max_payload_bytes} B")
    body = _unframe(payload, limits)
    meta, entries = _read_safetensors_header(body, limits)
    header = _parse_header(meta)
    raw = _load_tensors(body)
    tensors = _decode_tensors(raw, entries, header)
    if not allow_nonfinite and header.encoding in ("float16", "float32"):  # int8 is finite once its scales are
        for name, value in tensors.items():
            if not np.all(np.isfinite(value)):
                raise CodecError("nonfinite", f"tensor {name!r} holds NaN or Inf")
    return Message(header, tensors)


def _unframe(payload: bytes, limits: Limits) -> bytes:
    if len(payload) < 5:
        raise CodecError("truncated", f"frame of {len(payload)} B is shorter than its 5 B prefix")
    if payload[:3] != MAGIC:
        raise CodecError("bad_magic", "not a fedlite frame")
    version, flags = payload[3], payload[4]
    if version != PROTOCOL_VERSION:
        raise CodecError("version", f"protocol version {version} is not supported (this side speaks "
                         f"{PROTOCOL_VERSION})")
    if flags & ~FLAG_ZSTD:
        raise CodecError("flags", f"unknown flags 0x{flags:02x}")
    body = payload[5:]
    if flags & FLAG_ZSTD:
        body = _decompress(body, limits.max_decoded_bytes)
    elif len(body) > limits.max_decoded_bytes:
        raise CodecError("too_large", f"body of {len(body)} B exceeds {limits.max_decoded_bytes} B")
    return body


def _decompress(body: bytes, max_bytes: int) -> bytes:
    import zstandard

    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CodecError("compression", f"zstd body is corrupt: {exc}") from None
    if 0 <= size <= max_bytes:  # the usual case: the frame states its size, one exact allocation
        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
        except zstandard.ZstdError as exc:
            raise CodecError("compression", f"zstd body is corrupt: {exc}") from None
    if size > max_bytes:
        raise CodecError("too_large", f"decompressed body of {size} B exceeds {max_bytes} B")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            while chunk := reader.read(1 << 20):  # in chunks: no buffer sized by the limit up front
                out += chunk
                if len(out) > max_bytes:
                    raise CodecError("too_large", f"decompressed body exceeds {max_bytes} B")
    except zstandard.ZstdError as exc:
        raise CodecError("compression", f"zstd body is corrupt: {exc}") from None
    return bytes(out)


def _read_safetensors_header(body: bytes, limits: Limits) -> tuple[dict[str, Any], dict[str, Any]]:
    if len(body) < 8:
        raise CodecError("truncated", "body shorter than the safetensors header length")
    (length,) = struct.unpack("<Q", body[:8])
    if length > limits.max_header_bytes or 8 + length > len(body):
        raise CodecError("header", f"safetensors header of {length} B is too large or truncated")
    try:
        table = json.loads(body[8 : 8 + length])
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of more than 4300 digits
        raise CodecError("header", f"safetensors header is not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise CodecError("header", "safetensors header is not an object")
    meta = table.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get("fedlite"), str):
        raise CodecError("header", "missing fedlite header")
    if len(table) > limits.max_tensors:
        raise CodecError("too_large", f"{len(table)} tensors exceed the limit of {limits.max_tensors}")
    return meta, table


def _load_tensors(body: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return load(body)
    except Exception as exc:  # the container's own errors carry no common base class we can rely on
        raise CodecError("container", f"safetensors body is invalid: {exc}") from None


_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "federation": (str,), "round": (int,), "model_hash": (str,), "client_id": (str,),
    "num_examples": (int,), "metrics": (dict,), "encoding": (str,), "protocol": (int,),
    "sent_at": (int, float), "extra": (dict,), "run": (str,),
}


def _parse_header(meta: dict[str, Any]) -> Header:
    try:
        raw = json.loads(meta["fedlite"])
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of more than 4300 digits
        raise CodecError("header", f"fedlite header is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CodecError("header", "fedlite header is not an object")
    unknown = set(raw) - set(_HEADER_TYPES)
    missing = {"kind", "federation", "round", "model_hash", "encoding", "protocol"} - set(raw)
    if unknown or missing:
        raise CodecError("header", f"header fields unknown {sorted(unknown)} / missing {sorted(missing)}")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, _HEADER_TYPES[key]):
            raise CodecError("header", f"header field {key!r} has the wrong type")
    header = Header(**raw)
    _check_header_values(header)
    return header


def _check_header_values(header: Header) -> None:
    if header.protocol != PROTOCOL_VERSION:
        raise CodecError("version", f"header protocol {header.protocol} is not {PROTOCOL_VERSION}")
    if header.kind not in KINDS or header.encoding not in ENCODINGS:
        raise CodecError("header", f"unknown kind {header.kind!r} or encoding {header.encoding!r}")
    if header.round < 0 or header.num_examples < 0:
        raise CodecError("header", "round and num_examples must be >= 0")
    for key, value in header.metrics.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CodecError("header", f"metric {key!r} is not a number")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer no float can hold
            finite = False
        if not finite:
            raise CodecError("nonfinite", f"metric {key!r} is not finite")


def _decode_tensors(raw: dict[str, np.ndarray], entries: dict[str, Any], header: Header) -> dict[str, np.ndarray]:
    for name, entry in entries.items():
        if not isinstance(entry, dict) or _ST_DTYPES.get(entry.get("dtype")) is None:
            raise CodecError("tensor", f"tensor {name!r} has an unsupported dtype")
    if header.encoding == "int8":
        return _dequantize_all(raw)
    expected = {"float16": np.float16, "float32": np.float32, "blob": np.uint8}[header.encoding]
    out: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if value.dtype != expected or not _TENSOR_NAME.match(name):
            raise CodecError("tensor", f"tensor {name!r} is {value.dtype}, expected {np.dtype(expected)}")
        out[name] = value if expected is np.uint8 else value.astype(np.float32)
    if header.encoding == "blob" and (set(out) != {"blob"} or out["blob"].ndim != 1):
        raise CodecError("tensor", "a model frame carries exactly one 1-D uint8 tensor named 'blob'")
    return out


_MAX_SCALE = np.float32(np.finfo(np.float32).max / 128)  # |int8| <= 128


def _dequantize_all(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [name for name in raw if not name.endswith(SCALE_SUFFIX)]
    if len(names) * 2 != len(raw):
        raise CodecError("tensor", "every int8 tensor needs exactly one scale tensor")
    out: dict[str, np.ndarray] = {}
    for name in names:
        q, scale = raw[name], raw.get(name + SCALE_SUFFIX)
        if not _TENSOR_NAME.match(name) or q.dtype != np.int8:
            raise CodecError("tensor", f"tensor {name!r} must be int8 with an allowed name")
        if scale is None or scale.dtype != np.float32 or scale.ndim != 1:
            raise CodecError("tensor", f"tensor {name!r} has no valid float32 scale")
        channels = q.shape[-1] if q.ndim >= 2 else 1
        if scale.shape[0] != channels:
            raise CodecError("tensor", f"tensor {name!r} has {scale.shape[0]} scales for {channels} channels")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise CodecError("nonfinite", f"tensor {name!r} has a negative or non-finite scale")
        if np.any(scale > _MAX_SCALE):  # 128 * scale would overflow to Inf, and int8 values skip the finite check
            raise CodecError("nonfinite", f"tensor {name!r} has a scale beyond float32 range")
        out[name] = dequantize_int8(q, scale)
    return out
