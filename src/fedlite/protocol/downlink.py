"""Downlink deltas: a round's weights as the chain of steps from weights a device already holds.

Both sides compute the same float32 values: the aggregator's reference weights after round r are those of round
r - 1 plus the *decoded* step of round r's delta frame (`step_of`), added in float32, which is exactly what a
device that applies the frame computes (`apply_delta`). `digest` names a round's weights; the announcement
carries it, so a device checks what it holds, or what the chain gave it, before it trains on them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from fedlite.protocol.codec import Limits, Message, decode
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten, num_params, weight_specs


def digest(flat: np.ndarray) -> str:
    """sha256 (hex) of the weights as float32 little-endian values in the manifest's order."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f4").tobytes()).hexdigest()


def step_of(message: Message, manifest: dict[str, Any]) -> np.ndarray:
    """The flat float32 step a decoded delta frame adds to its base weights."""
    return flatten(message.tensors, manifest)


def delta_limits(manifest: dict[str, Any]) -> Limits:
    """Bounds for one delta frame of this model: no codec spends more than 4 bytes per weight, plus headers."""
    weights = 4 * num_params(manifest)
    return Limits(max_payload_bytes=weights + weights // 64 + 65536, max_decoded_bytes=weights + 65536)


def check_delta(message: Message, *, round_number: int, run: str, model_hash: str) -> None:
    """Raise ProtocolError unless `message` is the delta to round `round_number` of this run and model."""
    header = message.header
    if header.kind != "delta":
        raise ProtocolError("kind", f"expected a delta, got kind {header.kind!r}")
    if header.round != round_number or header.extra.get("base_round") != round_number - 1:
        raise ProtocolError("stale", f"delta from round {header.extra.get('base_round')} to {header.round}, "
                            f"expected {round_number - 1} to {round_number}")
    if header.run != run:
        raise ProtocolError("run", "delta belongs to another run")
    if header.model_hash != model_hash:
        raise ProtocolError("model_hash", "delta belongs to another model")


def apply_delta(flat: np.ndarray, payload: bytes, manifest: dict[str, Any], *, round_number: int, run: str,
                model_hash: str) -> np.ndarray:
    """`flat` (round `round_number` - 1's weights) plus the delta frame to round `round_number`, in float32."""
    message = decode(payload, limits=delta_limits(manifest), shapes=weight_specs(manifest))
    check_delta(message, round_number=round_number, run=run, model_hash=model_hash)
    return np.add(flat, step_of(message, manifest), dtype=np.float32)
