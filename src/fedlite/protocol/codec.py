"""Binary wire format for updates, weights and models: a versioned frame around a safetensors or compact body.

Frame layout (all messages that carry tensors):

    b"FLT" | version: u8 | flags: u8 | body

`version` is PROTOCOL_VERSION. Flag bit 0: the body is zstd-compressed. Flag bit 1: the body is *compact*
(below); other bits must be 0. A safetensors body is a safetensors file whose ``__metadata__["fedlite"]`` is
the JSON header (see `Header`). A compact body carries no tensor table:

    header length: u32 LE | header JSON (UTF-8) | tensor data

where the tensor data is, for each weight in the model's manifest order, that weight's wire tensors in the
order its codec lists them (`Codec.suffixes`), little-endian, unpadded; sizes follow from the model's shapes.
A compact body is compressed with zstd using `COMPACT_DICTIONARY` as a raw-content dictionary.

The header's ``encoding`` names the codec (`fedlite.protocol.codecs`: one module per codec, each registered by
name) that turned weights into wire tensors and back. Anything that is not exactly this raises `CodecError`
with a short reason tag; nothing is pickled, and every size the payload claims is checked before anything
it drives is allocated.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import numpy as np

from fedlite.protocol import PROTOCOL_VERSION, codecs
from fedlite.protocol.codecs.base import CodecError, Shape, Tensors, dequantize, quantize_symmetric
from fedlite.protocol.codecs.int8 import SCALE_SUFFIX

__all__ = ["CodecError", "SCALE_SUFFIX"]

MAGIC = b"FLT"
FLAG_ZSTD = 0x01
FLAG_COMPACT = 0x02
KINDS = ("update", "weights", "delta", "model")
ENCODINGS = tuple(codecs.names())
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_./-]{1,128}$")
_ST_DTYPES = {"I8": np.int8, "F16": np.float16, "F32": np.float32, "U8": np.uint8}
# The raw-content zstd dictionary of compact bodies: what an update header's JSON spends most bytes on.
COMPACT_DICTIONARY = (
    b'{"kind":"update","federation":"","round":0,"model_hash":"","client_id":"","num_examples":0,'
    b'"metrics":{"train_loss":0,"steps":0,"eval_loss_before":0,"eval_accuracy_before":0,"eval_loss_after":0,'
    b'"eval_accuracy_after":0},"encoding":"ternary-ef","protocol":2,"sent_at":0,"extra":{},"run":""}'
)


@dataclass(frozen=True)
class Limits:
    """Hard bounds applied before any allocation driven by the payload."""

    max_payload_bytes: int = 64 * 1024 * 1024
    max_decoded_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 4096
    max_header_bytes: int = 1024 * 1024


# Room for an update's JSON header (metrics, ids, hashes) in its safetensors table.
HEADER_ALLOWANCE = 16 * 1024

Layout = Sequence[tuple[str, Shape]]


def update_limits(shapes: Sequence[Shape], base: Limits = Limits(), encoding: str = "int8") -> Limits:
    """Limits sized from a model: an update of these tensor shapes in `encoding`, plus room for its header.

    The decoded body of a genuine update is its header and tensor table (bounded by `HEADER_ALLOWANCE` plus
    256 B per wire tensor) and the codec's bytes per weight (`Codec.max_bytes`: for int8 one byte per weight and
    four per scale); anything that expands beyond that is refused while decompressing, so a decompression bomb
    costs O(model), not O(what it claims).
    """
    codec = codecs.get(encoding)
    parts = len(codec.suffixes) * len(shapes)
    table = HEADER_ALLOWANCE + 256 * parts
    decoded = 8 + table + sum(codec.max_bytes(tuple(shape)) for shape in shapes)
    payload = 5 + decoded + decoded // 128 + 1024  # zstd's worst case for incompressible input, and the prefix
    return Limits(max_payload_bytes=min(base.max_payload_bytes, payload),
                  max_decoded_bytes=min(base.max_decoded_bytes, decoded),
                  max_tensors=min(base.max_tensors, parts + 8),  # slack: extra names refused by name
                  max_header_bytes=min(base.max_header_bytes, table))


@dataclass
class Header:
    """What a frame says about itself; travels as JSON (safetensors metadata, or the compact body's header)."""

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
    tensors: dict[str, Any]  # float32 / uint8 arrays, or `Codes` when decoded with ``codes=True``


# --- int8 quantization (the first codec's, kept here for callers that quantize by hand) --------------------


def quantize_int8(
    x: np.ndarray, *, stochastic: bool = False, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: per channel (last axis) for rank >= 2, one scale otherwise."""
    return quantize_symmetric(x, 127, True, (rng or np.random.default_rng()) if stochastic else None)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return dequantize(q, scale, q.shape, True)


# --- encoding -----------------------------------------------------------------------------------


def encode_update(
    delta: dict[str, np.ndarray],
    header: Header,
    *,
    encoding: str = "int8",
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
    compress: bool = True,
    compact: bool | None = None,
) -> bytes:
    """A model update (uplink) in `encoding`; codecs with error feedback start from no residual here."""
    return encode_update_with_residual(delta, header, encoding=encoding, stochastic=stochastic, rng=rng,
                                       compress=compress, compact=compact)[0]


def encode_update_with_residual(
    delta: dict[str, np.ndarray],
    header: Header,
    *,
    encoding: str = "int8",
    residual: Mapping[str, np.ndarray] | None = None,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
    compress: bool = True,
    compact: bool | None = None,
) -> tuple[bytes, Tensors | None]:
    """(frame, the codec's new residual or None). `delta` must be in the model's manifest order (a compact
    body has no names); `compact` None: the codec's default body; `stochastic`: unbiased stochastic rounding
    in the codecs that have it."""
    codec = codecs.get(encoding)
    if "update" not in codec.kinds:
        raise ValueError(f"{encoding} does not encode updates")
    rng = (rng or np.random.default_rng()) if stochastic else None
    tensors, left = codec.encode(delta, rng=rng, residual=residual)
    use_compact = codec.compact if compact is None else compact
    return _encode(tensors, _with(header, "update", encoding), compress, list(delta) if use_compact else None,
                   codec.suffixes), left


def encode_weights(
    weights: dict[str, np.ndarray], header: Header, *, dtype: str = "float32", compress: bool = True
) -> bytes:
    """Global weights (downlink): float32, float16, or int8 per channel (`codecs.DOWNLINK`)."""
    if dtype not in codecs.DOWNLINK:
        raise ValueError(f"weights dtype must be one of {', '.join(codecs.DOWNLINK)}, not {dtype!r}")
    codec = codecs.get(dtype)
    tensors, _ = codec.encode(weights)
    return _encode(tensors, _with(header, "weights", dtype), compress)


def encode_delta(step: dict[str, np.ndarray], header: Header, *, encoding: str, base_round: int,
                 compress: bool = True) -> bytes:
    """A downlink delta (kind ``delta``): the step from round `base_round`'s weights to ``header.round``'s, in an
    update codec (`codecs.UPLINK`); ``header.extra["base_round"]`` names the weights it applies to."""
    codec = codecs.get(encoding)
    if "update" not in codec.kinds:
        raise ValueError(f"{encoding} does not encode deltas")
    tensors, _ = codec.encode(step)
    values = asdict(header)
    values["extra"] = {**header.extra, "base_round": int(base_round)}
    return _encode(tensors, _with(Header(**values), "delta", encoding), compress,
                   list(step) if codec.compact else None, codec.suffixes)


def encode_model(model_file: bytes, header: Header, *, compress: bool = True) -> bytes:
    """A .tflite model file; the manifest goes in ``header.extra["manifest"]``."""
    blob = np.frombuffer(model_file, dtype=np.uint8)
    return _encode({"blob": blob}, _with(header, "model", "blob"), compress)


def _with(header: Header, kind: str, encoding: str) -> Header:
    values = asdict(header)
    values.update(kind=kind, encoding=encoding, protocol=PROTOCOL_VERSION, sent_at=header.sent_at or time.time())
    return Header(**values)


def _encode(tensors: dict[str, np.ndarray], header: Header, compress: bool, compact_order: list[str] | None = None,
            suffixes: Sequence[str] = ()) -> bytes:
    for name in tensors:
        if not _TENSOR_NAME.match(name.split(":", 1)[0]):
            raise ValueError(f"tensor name {name!r} is not allowed on the wire")
    text = json.dumps(asdict(header), separators=(",", ":"), allow_nan=False).encode()
    flags = 0
    if compact_order is not None:
        parts = [struct.pack("<I", len(text)), text]
        parts += [_little_endian(tensors[name + suffix]).tobytes() for name in compact_order for suffix in suffixes]
        body = b"".join(parts)
        flags |= FLAG_COMPACT
    else:
        from safetensors.numpy import save

        body = save({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                    metadata={"fedlite": text.decode()})
    if compress:
        body = _compressor(compact_order is not None).compress(body)
        flags |= FLAG_ZSTD
    return MAGIC + bytes([PROTOCOL_VERSION, flags]) + body


def _little_endian(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))


@cache
def _dictionary() -> Any:
    import zstandard

    return zstandard.ZstdCompressionDict(COMPACT_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


_CONTEXTS = threading.local()  # zstd contexts are not thread-safe: one set per thread, reused (a dictionary is
# digested once per thread instead of once per message)


def _per_thread(key: str, make: Callable[[], Any]) -> Any:
    """This thread's context named `key`, made on first use."""
    context = getattr(_CONTEXTS, key, None)
    if context is None:
        context = make()
        setattr(_CONTEXTS, key, context)
    return context


def _compressor(compact: bool) -> Any:
    import zstandard

    if compact:
        return _per_thread("compressor_compact", lambda: zstandard.ZstdCompressor(level=3, dict_data=_dictionary()))
    return _per_thread("compressor", lambda: zstandard.ZstdCompressor(level=3))


def _decompressor(compact: bool) -> Any:
    import zstandard

    if compact:
        return _per_thread("decompressor_compact", lambda: zstandard.ZstdDecompressor(dict_data=_dictionary()))
    return _per_thread("decompressor", zstandard.ZstdDecompressor)


# --- decoding -----------------------------------------------------------------------------------


def decode(payload: bytes, *, limits: Limits = Limits(), allow_nonfinite: bool = False,
           shapes: Layout | None = None, check_header: Callable[[Header], None] | None = None,
           codes: bool = False) -> Message:
    """Parse and check a frame; tensors come back as float32 (dequantized) or uint8 blobs, or with `codes` as
    `Codes` (integer codes and scales, unexpanded) where the frame's codec is a quantizing one.

    `shapes`: the model's weights (name, shape) in manifest order; needed for compact bodies and for codecs whose
    tensors do not carry the weight's shape, and checked exactly when given. `check_header` runs on the parsed
    header before any tensor is decoded (it may raise to refuse the frame cheaply).
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError("type", f"payload must be bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > limits.max_payload_bytes:
        raise CodecError("too_large", f"payload of {len(payload)} B exceeds {limits.max_payload_bytes} B")
    flags, body = _unframe(payload, limits)
    source: _TableSource | _CompactSource
    if flags & FLAG_COMPACT:
        text, start = _read_compact_header(body, limits)
        header = _parse_header(text)
        codec = codecs.get(header.encoding)
        if shapes is None:
            raise CodecError("layout", "a compact frame decodes only against the model's layout")
        source = _CompactSource(body, start, shapes, allow_nonfinite)
    else:
        meta, entries, start = _read_safetensors_header(body, limits)
        header = _parse_header(meta["fedlite"])
        codec = codecs.get(header.encoding)
        source = _TableSource(body, start, entries, shapes, codec, allow_nonfinite)
    if check_header is not None:
        check_header(header)
    tensors = codec.decode_codes(source, header) if codes and codec.coded else codec.decode(source, header)
    source.finish()
    return Message(header, tensors)


def read_header(payload: bytes, *, limits: Limits = Limits()) -> Header:
    """A frame's checked header alone, its tensors left undecoded (for tools that route or count frames)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError("type", f"payload must be bytes, not {type(payload).__name__}")
    flags, body = _unframe(bytes(payload), limits)
    if flags & FLAG_COMPACT:
        text, _ = _read_compact_header(body, limits)
    else:
        text = _read_safetensors_header(body, limits)[0]["fedlite"]
    return _parse_header(text)


def _unframe(payload: bytes, limits: Limits) -> tuple[int, bytes]:
    if len(payload) < 5:
        raise CodecError("truncated", f"frame of {len(payload)} B is shorter than its 5 B prefix")
    if payload[:3] != MAGIC:
        raise CodecError("bad_magic", "not a fedlite frame")
    version, flags = payload[3], payload[4]
    if version != PROTOCOL_VERSION:
        raise CodecError("version", f"protocol version {version} is not supported (this side speaks "
                         f"{PROTOCOL_VERSION})")
    if flags & ~(FLAG_ZSTD | FLAG_COMPACT):
        raise CodecError("flags", f"unknown flags 0x{flags:02x}")
    if flags & FLAG_ZSTD:  # decompressed from a view: the compressed body is not copied first
        return flags, _decompress(memoryview(payload)[5:], limits.max_decoded_bytes, bool(flags & FLAG_COMPACT))
    body = payload[5:]
    if len(body) > limits.max_decoded_bytes:
        raise CodecError("too_large", f"body of {len(body)} B exceeds {limits.max_decoded_bytes} B")
    return flags, body


def _decompress(body: bytes | memoryview, max_bytes: int, compact: bool) -> bytes:
    import zstandard

    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CodecError("compression", f"zstd body is corrupt: {exc}") from None
    if 0 <= size <= max_bytes:  # the usual case: the frame states its size, one exact allocation
        try:
            return _decompressor(compact).decompress(body, max_output_size=max_bytes)
        except zstandard.ZstdError as exc:
            raise CodecError("compression", f"zstd body is corrupt: {exc}") from None
    if size > max_bytes:
        raise CodecError("too_large", f"decompressed body of {size} B exceeds {max_bytes} B")
    out = bytearray()
    try:
        with _decompressor(compact).stream_reader(io.BytesIO(body)) as reader:
            while chunk := reader.read(1 << 20):  # in chunks: no buffer sized by the limit up front
                out += chunk
                if len(out) > max_bytes:
                    raise CodecError("too_large", f"decompressed body exceeds {max_bytes} B")
    except zstandard.ZstdError as exc:
        raise CodecError("compression", f"zstd body is corrupt: {exc}") from None
    return bytes(out)


def _read_compact_header(body: bytes, limits: Limits) -> tuple[str, int]:
    if len(body) < 4:
        raise CodecError("truncated", "compact body shorter than its header length")
    (length,) = struct.unpack("<I", body[:4])
    if length > limits.max_header_bytes or 4 + length > len(body):
        raise CodecError("header", f"compact header of {length} B is too large or truncated")
    try:
        return body[4 : 4 + length].decode(), 4 + length
    except UnicodeDecodeError:
        raise CodecError("header", "compact header is not UTF-8") from None


def _read_safetensors_header(body: bytes, limits: Limits) -> tuple[dict[str, Any], dict[str, Any], int]:
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
    return meta, table, 8 + length


class _TableSource:
    """The tensors of a safetensors body, as views into it: the table is checked whole before any is read."""

    def __init__(self, body: bytes, start: int, entries: dict[str, Any], shapes: Layout | None,
                 codec: codecs.Codec, allow_nonfinite: bool) -> None:
        self.body, self.start, self.allow_nonfinite = body, start, allow_nonfinite
        self.entries = self._check_table(entries, len(body) - start, codec)
        self.taken: set[str] = set()
        bases = list(dict.fromkeys(name.split(":", 1)[0] for name in self.entries))
        if shapes is not None:
            self.weights: list[tuple[str, Shape]] = [(name, tuple(int(d) for d in shape)) for name, shape in shapes]
            expected = [name for name, _ in self.weights]
            if set(bases) != set(expected):
                missing, extra = sorted(set(expected) - set(bases)), sorted(set(bases) - set(expected))
                raise CodecError("names", f"tensor names differ from the model: missing {missing[:3]}, "
                                 f"extra {extra[:3]}")
        elif codec.self_describing:
            unnamed = [base for base in bases if base not in self.entries]
            if unnamed:
                raise CodecError("tensor", f"tensor {unnamed[0]!r} has parts but no tensor of its own")
            self.weights = [(base, self.entries[base][1]) for base in bases]
        else:
            raise CodecError("layout", f"{codec.name} frames decode only against the model's layout")
        self.shapes = dict(self.weights)

    @staticmethod
    def _check_table(entries: dict[str, Any], data_size: int, codec: codecs.Codec
                     ) -> dict[str, tuple[np.dtype[Any], Shape, int]]:
        """name -> (dtype, shape, offset): dtypes known, names allowed, offsets exact, contiguous, covering."""
        checked: dict[str, tuple[np.dtype[Any], Shape, int]] = {}
        spans: list[tuple[int, int]] = []
        for name, entry in entries.items():
            if not isinstance(entry, dict) or _ST_DTYPES.get(entry.get("dtype")) is None:
                raise CodecError("tensor", f"tensor {name!r} has an unsupported dtype")
            base, sep, suffix = name.partition(":")
            if not _TENSOR_NAME.match(base) or sep + suffix not in codec.suffixes:
                raise CodecError("tensor", f"tensor {name!r} is not a part of an {codec.name} frame")
            dtype = np.dtype(_ST_DTYPES[entry["dtype"]]).newbyteorder("<")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                    and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise CodecError("container", f"tensor {name!r} has a malformed shape or offsets")
            begin, end = offsets
            if not 0 <= begin <= end <= data_size or end - begin != dtype.itemsize * math.prod(shape):
                raise CodecError("container", f"tensor {name!r}: offsets {offsets} do not hold {shape} {dtype}")
            checked[name] = (dtype, tuple(shape), begin)
            spans.append((begin, end))
        position = 0
        for begin, end in sorted(spans):
            if begin != position:
                raise CodecError("container", "tensor data overlaps or leaves gaps")
            position = end
        if position != data_size:
            raise CodecError("container", f"tensor data covers {position} B of {data_size} B")
        return checked

    def take(self, weight: str, suffix: str, dtype: np.dtype[Any], count: int) -> np.ndarray:
        name = weight + suffix
        entry = self.entries.get(name)
        if entry is None:
            raise CodecError("tensor", f"tensor {name!r} is missing")
        stored, shape, offset = entry
        if stored != dtype.newbyteorder("<"):
            raise CodecError("tensor", f"tensor {name!r} is {stored}, expected {dtype}")
        if suffix == "":
            expected = self.shapes[weight]
            if shape != expected:
                raise CodecError("shape", f"{weight} has shape {shape}, the model has {expected}")
        elif shape != (count,):
            raise CodecError("tensor", f"tensor {name!r} has shape {shape}, expected ({count},)")
        self.taken.add(name)
        return np.frombuffer(self.body, dtype=stored, count=count, offset=self.start + offset)

    def finish(self) -> None:
        left = sorted(set(self.entries) - self.taken)
        if left:
            raise CodecError("tensor", f"unexpected tensors {left[:3]}")


class _CompactSource:
    """The tensors of a compact body: consecutive exact-size slices, in the model's order."""

    def __init__(self, body: bytes, start: int, shapes: Layout, allow_nonfinite: bool) -> None:
        self.body, self.position, self.allow_nonfinite = body, start, allow_nonfinite
        self.weights = [(name, tuple(int(d) for d in shape)) for name, shape in shapes]

    def take(self, weight: str, suffix: str, dtype: np.dtype[Any], count: int) -> np.ndarray:
        dtype = dtype.newbyteorder("<")
        need = count * dtype.itemsize
        if self.position + need > len(self.body):
            raise CodecError("truncated", f"compact body ends inside tensor {weight + suffix!r}")
        out = np.frombuffer(self.body, dtype=dtype, count=count, offset=self.position)
        self.position += need
        return out

    def finish(self) -> None:
        if self.position != len(self.body):
            raise CodecError("size", f"{len(self.body) - self.position} B after the model's last tensor")


_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "federation": (str,), "round": (int,), "model_hash": (str,), "client_id": (str,),
    "num_examples": (int,), "metrics": (dict,), "encoding": (str,), "protocol": (int,),
    "sent_at": (int, float), "extra": (dict,), "run": (str,),
}


def _parse_header(text: str) -> Header:
    try:
        raw = json.loads(text)
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
