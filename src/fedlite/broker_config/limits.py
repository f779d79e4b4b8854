"""The broker's maximum MQTT packet size, derived from the model a federation trains."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
DEFAULT_MAX_PACKET_SIZE = 16 * MIB  # when no model is given: a float32 model of about 4 M parameters
MIN_MAX_PACKET_SIZE = 64 * 1024  # below this, round announcements naming many devices no longer fit
MQTT_MAX_PACKET_SIZE = 268_435_455  # the largest size MQTT's variable-length "remaining length" can express
FLOOR = MIB  # a derived limit is never below this (control messages, small models)
MARGIN = 1.25  # derived limit = largest legitimate packet x MARGIN + SLACK, then FLOOR
SLACK = 64 * 1024

# Bytes a frame adds around its tensor data, each an upper bound:
FRAME_PREFIX = 5  # b"FLT" | version | flags
SAFETENSORS_FIXED = 8 + 64 + 7  # header length u64, the `__metadata__` key and braces, padding to 8
TENSOR_ENTRY = 256  # one safetensors header entry: name (<= 128 + ":scale"), dtype, shape, data offsets
HEADER_FIELDS = 1024  # the fedlite header's own fields (kind, federation, round, hashes, metrics, extra)
SIGNATURE = 3 + 1 + 8 + 64  # the signed envelope: b"FLS" | version | key id | Ed25519 signature
MQTT_PUBLISH = 1024  # fixed header, topic (fl/<federation>/model/<sha256>), packet id, properties


def _zstd_bound(size: int) -> int:
    """The most zstd can emit for `size` input bytes (ZSTD_COMPRESSBOUND, rounded up)."""
    return size + (size >> 8) + 128


def _scales(shape: list[int]) -> int:
    """How many float32 scales the int8 encoding sends for a tensor: one per channel (last axis) or one."""
    return shape[-1] if len(shape) >= 2 else 1


def largest_packet(manifest: Mapping[str, Any], train_tflite_bytes: int) -> int:
    """Upper bound, in bytes, of the largest MQTT packet a federation training this model exchanges.

    The candidates are the `model` frame (train.tflite, and infer_int8.tflite for deployments, each with
    the manifest in its header), the float32 `weights` frame and the int8 `update` frame, each zstd's
    worst case (incompressible data), signed, in a PUBLISH packet. JSON control messages are far smaller.
    """
    weights = manifest["weights"]
    num_params = int(manifest["num_params"])
    manifest_json = len(json.dumps(manifest, separators=(",", ":")))
    model_files = [int(train_tflite_bytes)]
    infer = manifest.get("files", {}).get("infer_int8")
    if isinstance(infer, Mapping) and isinstance(infer.get("bytes"), int):
        model_files.append(infer["bytes"])

    def frame(data: int, tensors: int, header: int) -> int:
        # the fedlite header travels as a JSON string inside the safetensors header: escaping at most doubles it
        body = SAFETENSORS_FIXED + 2 * (HEADER_FIELDS + header) + tensors * TENSOR_ENTRY + data
        return FRAME_PREFIX + _zstd_bound(body) + SIGNATURE + MQTT_PUBLISH

    model = frame(max(model_files), 1, manifest_json)
    float32_weights = frame(4 * num_params, len(weights), 0)
    int8_update = frame(num_params + 4 * sum(_scales(list(w["shape"])) for w in weights), 2 * len(weights), 0)
    return max(model, float32_weights, int8_update)


def packet_limit_for_model(manifest: Mapping[str, Any], train_tflite_bytes: int) -> int:
    """`max_packet_size` for a broker whose federation trains this model: the largest legitimate packet
    times MARGIN plus SLACK, at least FLOOR, rounded up to a KiB; ValueError if MQTT cannot carry it."""
    limit = max(FLOOR, int(largest_packet(manifest, train_tflite_bytes) * MARGIN) + SLACK)
    limit = -(-limit // 1024) * 1024
    if limit > MQTT_MAX_PACKET_SIZE:
        raise ValueError(f"the model needs packets of {limit} B, more than MQTT's maximum of {MQTT_MAX_PACKET_SIZE} B")
    return limit


def packet_limit_for_model_dir(model_dir: str | os.PathLike) -> int:
    """`packet_limit_for_model` for an exported model directory (manifest.json + train.tflite)."""
    from fedlite.protocol.manifest import TRAIN_FILE, ManifestError, load_manifest

    manifest = load_manifest(model_dir)
    entry = manifest["files"].get("train") if isinstance(manifest["files"], Mapping) else None
    train = Path(model_dir) / (entry["path"] if isinstance(entry, Mapping) and "path" in entry else TRAIN_FILE)
    try:
        size = train.stat().st_size
    except OSError as e:
        raise ManifestError(f"{model_dir}: cannot read the trainable model {train.name}: {e.strerror}") from e
    return packet_limit_for_model(manifest, size)


def check_max_packet_size(size: int) -> int:
    """`size` if the broker can use it as max_packet_size; else ValueError naming the allowed range."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_MAX_PACKET_SIZE <= size <= MQTT_MAX_PACKET_SIZE:
        allowed = f"{MIN_MAX_PACKET_SIZE}-{MQTT_MAX_PACKET_SIZE}"
        raise ValueError(f"invalid maximum packet size {size!r}: use {allowed} bytes")
    return size
