"""What aggregators of one federation say to each other on `fl/<federation>/cluster/...`, every message signed.

- ``brief`` (coordinator, retained): the open attempt, with what a member needs to check its updates; ``closed``
  asks every member for its partial sum.
- ``claim/<member>`` → ``grant/<member>``: a member asks before it admits devices' updates (first claim wins,
  so no update is counted twice), in batches (`claims.ClaimBatcher`); the grant answers a batch.
- ``member/<member>`` (retained; the member's last will clears it): a member is up (`MemberPresence`).
- ``partial/<member>``: a member's partial sum for a closed attempt: a JSON header (`PartialHeader`) and the
  running sum as safetensors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedlite.aggregator.rounds import PartialBook
from fedlite.protocol import PROTOCOL_VERSION
from fedlite.protocol.messages import MessageError, from_json, to_json
from fedlite.protocol.signing import Verifier

MAX_PARTIAL_HEADER_BYTES = 16 * 1024 * 1024  # a header lists at most every accepted client's numbers
_LENGTH = struct.Struct(">I")
M = TypeVar("M")


@dataclass
class ClusterBrief:
    """The coordinator's open (or closed) attempt, as members need it."""

    federation: str
    coordinator: str
    run: str
    model_hash: str
    round: int
    session: str
    state: str  # open | closed
    selected: list[str]
    deadline: float
    max_weight: float | None = None  # None: no cap
    norm_reference: list[float] | None = None  # None: no adaptive norm bound
    issued_at: float = 0.0
    type: str = "cluster_brief"
    protocol: int = PROTOCOL_VERSION


@dataclass
class MemberPresence:
    """A member is connected and follows the briefs (retained; cleared by its last will when it goes)."""

    federation: str
    member: str
    started_at: float
    type: str = "cluster_member"
    protocol: int = PROTOCOL_VERSION


@dataclass
class Claim:
    """A member asks to admit the updates of `clients` (checked, each of them) to the attempt `session`."""

    member: str
    round: int
    session: str
    batch: int  # the member's number for this batch of claims, repeated by the grant
    clients: list[str]
    type: str = "cluster_claim"
    protocol: int = PROTOCOL_VERSION


@dataclass
class Grant:
    """The coordinator's answer to a batch of claims: each client is granted (no one holds its update yet) unless
    `refused` says why not (late: the attempt is closed or not the open one, not_selected, duplicate: held by
    another aggregator)."""

    round: int
    session: str
    batch: int
    refused: dict[str, str]
    type: str = "cluster_grant"
    protocol: int = PROTOCOL_VERSION


@dataclass
class PartialHeader:
    """Which member's partial sum for which attempt, with its bookkeeping (`rounds.PartialBook`)."""

    member: str
    round: int
    session: str
    book: PartialBook
    cpu_seconds: float = 0.0  # the member process's CPU time so far (for load reports)
    type: str = "cluster_partial"
    protocol: int = PROTOCOL_VERSION


def encode_partial(header: PartialHeader, arrays: dict[str, np.ndarray]) -> bytes:
    """length (u32, big-endian) | header JSON | safetensors of the running sum and sketches."""
    from safetensors.numpy import save

    text = to_json(header)
    return _LENGTH.pack(len(text)) + text + save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def decode_partial(payload: bytes) -> tuple[PartialHeader, dict[str, np.ndarray]]:
    """The header and arrays of `encode_partial`'s frame; MessageError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(payload) < _LENGTH.size:
        raise MessageError("truncated", "partial sum shorter than its length prefix")
    (length,) = _LENGTH.unpack_from(payload)
    if length > min(MAX_PARTIAL_HEADER_BYTES, len(payload) - _LENGTH.size):
        raise MessageError("malformed", f"partial sum header of {length} B does not fit")
    header = from_json(PartialHeader, payload[_LENGTH.size:_LENGTH.size + length])
    try:
        arrays = load(bytes(payload[_LENGTH.size + length:]))
    except (SafetensorError, ValueError) as exc:
        raise MessageError("malformed", f"partial sum arrays: {exc}") from None
    return header, arrays


def read_signed(verifier: Verifier, cls: type[M], topic: str, payload: bytes) -> M:
    """A signed cluster control message of type `cls`: its signature checked, then its fields; a ProtocolError
    (`SignatureError` or `MessageError`, whose reason is counted) otherwise."""
    return from_json(cls, verifier.verify(topic, payload))
