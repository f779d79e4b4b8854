"""JSON control messages: round announcements, device status, device reports, deployment instructions and the
stages of secure aggregation.

Every message is one UTF-8 JSON object with ``"type"`` and ``"protocol"`` fields. Unknown fields are
ignored (forward compatible); missing or mistyped fields raise `MessageError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fedlite.protocol import PROTOCOL_VERSION
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.selection import Selection

MAX_CONTROL_BYTES = 1024 * 1024


class MessageError(ProtocolError):
    """A control message that is not valid JSON of the expected shape."""


@dataclass
class TrainingPlan:
    """What the selected devices run this round."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    stochastic_rounding: bool = False
    max_examples: int = 0
    encoding: str = "int8"  # the update codec (fedlite.protocol.codecs); absent: int8, as before codecs had names
    # 0: synchronous (an update answers the open round). > 0: asynchronous (FedBuff): a device keeps training on the
    # version it fetched while later ones are announced, and its update counts while it is at most this many
    # versions behind
    max_staleness: int = 0


@dataclass
class SecurePlan:
    """A secure-aggregation round's arithmetic and pace (`RoundAnnouncement.secure`; see `protocol.secagg`)."""

    clip: float  # L2 bound C of each device's delta
    bound: float  # per-coordinate clamp B of the rotated, weighted delta
    levels: int  # L: [-B, B] maps to integers in [-L, L]
    max_examples: int  # n_cap: a device's weight is min(n, n_cap) / n_cap
    participants: int  # N: the ring Z_2^bits holds the sum of N inputs
    bits: int  # k of the ring (what `Quantization.bits` gives for N and L)
    rotation: str  # the rotation's public seed
    stage_seconds: float  # how long the aggregator waits for each key stage


# What the round topic says (`RoundAnnouncement.state`) and why an attempt closed (`RoundAnnouncement.reason`).
ROUND_STATES = ("open", "closed", "done")
CLOSE_REASONS = ("quorum", "deadline", "abandoned", "failed")


@dataclass
class RoundAnnouncement:
    """Retained on the round topic: what the current round attempt (or the run) is doing right now.

    Meaningful fields per `state`:

    - ``open``: all but `accepted` and `reason`: the devices `selection` picks (see `protocol.selection`) train
      from `weights_topic` before `deadline`;
    - ``closed``: the attempt `session` of `round` is over: `accepted` updates, closed for `reason` (quorum,
      deadline, abandoned, failed); the other fields repeat its `open` announcement, for the record. Wait, never
      train for it;
    - ``done``: the run is over: `round` is its last round, `session`, `accepted` and `reason` those of the attempt
      that completed it; `selection` selects nobody, `weights_topic` "" and `deadline` 0.

    `federation`, `model_hash`, `model_topic`, `issued_at` and the run fields (`run`, `run_started_at`, `epoch`)
    are meaningful in every state.
    """

    federation: str
    round: int
    model_hash: str
    model_topic: str
    weights_topic: str
    selection: Selection  # seed and threshold: its size does not grow with the number selected
    deadline: float
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    session: str = ""  # unique per announcement: a retried or resumed round is a new session
    state: str = "open"  # open | closed | done
    issued_at: float = 0.0
    run: str = ""  # the aggregator run (random id, unique per state directory)
    run_started_at: float = 0.0  # when that run began: a later one supersedes it
    epoch: int = 0  # the aggregator process start within the run: rounds are ordered by (epoch, round)
    accepted: int = 0  # closed, done: the updates the attempt accepted
    reason: str = ""  # closed, done: why the attempt closed (CLOSE_REASONS)
    # open: `protocol.downlink.digest` of the weights on `weights_topic` ("" when they are not float32): a device
    # that holds weights with this digest needs no download
    weights_digest: str = ""
    # open: delta frames to this round start at round `delta_base` + 1 (0: none); a device holding the weights of
    # round v, delta_base <= v < round, may apply the deltas of rounds v + 1 .. round instead of the full weights
    delta_base: int = 0
    # open: the round is a secure-aggregation round (the selected devices run its stages, `SecureMessage`); None:
    # devices send their updates in the clear
    secure: SecurePlan | None = None
    type: str = "round"
    protocol: int = PROTOCOL_VERSION


@dataclass
class DeviceStatus:
    """Retained on a device's status topic; the broker publishes the offline last will."""

    client_id: str
    state: str  # online | training | offline
    eligible: bool = False
    failed_gates: dict[str, str] = field(default_factory=dict)
    num_examples: int = 0
    runtime: str = ""
    agent_version: str = ""
    cached_models: list[str] = field(default_factory=list)
    deployed_model: str = ""
    updated_at: float = 0.0
    # the update encodings the device can produce; absent: int8 only (agents that predate the codec registry)
    encodings: list[str] = field(default_factory=lambda: ["int8"])
    weights_run: str = ""  # the run of the global weights the device holds ("" none)
    weights_round: int = 0  # ... and their round: the base its next downlink deltas start from
    type: str = "status"
    protocol: int = PROTOCOL_VERSION


@dataclass
class DeviceReport:
    """A device's answer that is not an update: a decline, an abort, or evaluation numbers.

    A report about a round names the attempt it answers: the announcement's `run`, `round` and `session`
    (a `deployed` report names a registry version in `round`, and no run or session).
    """

    client_id: str
    round: int
    kind: str  # declined | aborted | evaluation | deployed
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    sent_at: float = 0.0
    run: str = ""  # the announcement's run
    session: str = ""  # the announcement's session: a report for another attempt is refused as late
    type: str = "report"
    protocol: int = PROTOCOL_VERSION


@dataclass
class RevealedShare:
    """One share a device reveals in the unmask stage: its Shamir point, "self" or "mask", the share (base64)."""

    point: int
    kind: str
    share: str


SECURE_STAGES = ("advertise", "share", "masked", "unmask")


@dataclass
class SecureMessage:
    """A device's message in a secure-aggregation round, on its secagg topic. Stage fields:

    - ``advertise``: `encryption_key`, `mask_key` (X25519 public keys) and `seed_commitment`, base64;
    - ``share``: `shares`, {neighbour: its sealed shares of my self-mask seed and mask key, base64};
    - ``masked``: `length` and `bits` of the packed masked input that follows the JSON after one newline byte,
      `bytes_down` (what the device received for the round) and `cpu_seconds` (spent on the secure stages);
    - ``unmask``: `revealed`, {neighbour: the share of its secret the aggregator asked for}.
    """

    client_id: str
    run: str
    round: int
    session: str
    stage: str  # SECURE_STAGES
    encryption_key: str = ""
    mask_key: str = ""
    seed_commitment: str = ""
    shares: dict[str, str] = field(default_factory=dict)
    length: int = 0
    bits: int = 0
    bytes_down: int = 0
    cpu_seconds: float = 0.0  # masked: the CPU the device spent on the secure stages so far (not training)
    revealed: dict[str, RevealedShare] = field(default_factory=dict)
    type: str = "secagg"
    protocol: int = PROTOCOL_VERSION


@dataclass
class AdvertEntry:
    """A neighbour's advertised keys, as the aggregator relays them (base64)."""

    client: str
    encryption_key: str
    mask_key: str
    seed_commitment: str


RELAY_STAGES = ("share", "masked", "unmask", "abort")


@dataclass
class RelayMessage:
    """The aggregator's signed message to one device of a secure round, on that device's relay topic. Stages:

    - ``share``: `threshold`, `points` (each neighbour's Shamir point and the device's own) and `neighbours`;
    - ``masked``: `shares`, {dealer: the sealed shares it dealt to this device}; send the masked input;
    - ``unmask``: `survivors` (reveal their self-mask seed shares) and `dropped` (their mask-key shares);
    - ``abort``: the round cannot go on (`reason`): forget its keys and shares.
    """

    federation: str
    run: str
    round: int
    session: str
    stage: str  # RELAY_STAGES
    threshold: int = 0
    points: dict[str, int] = field(default_factory=dict)
    neighbours: list[AdvertEntry] = field(default_factory=list)
    shares: dict[str, str] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reason: str = ""
    issued_at: float = 0.0
    type: str = "relay"
    protocol: int = PROTOCOL_VERSION


def split_frame(payload: bytes) -> tuple[bytes, bytes]:
    """(the JSON, the binary body) of a message that may carry one after a newline byte (a masked input)."""
    head, _, body = payload.partition(b"\n")
    return head, body


@dataclass
class DeployTarget:
    """An int8 inference model to install: its registry version, sha256 and the topic of its model frame."""

    version: int
    sha256: str
    model_topic: str


@dataclass
class CanaryTarget:
    """The candidate of a staged rollout and the devices that install it first."""

    version: int
    sha256: str
    model_topic: str
    devices: list[str]


@dataclass
class DeployInstruction:
    """Retained on the deploy topic: the stable model for every device, and a canary candidate for a few."""

    federation: str
    deployment_id: str
    stable: DeployTarget | None  # present, may be null (nothing deployed yet)
    canary: CanaryTarget | None  # present, may be null (no rollout in its canary stage)
    issued_at: float = 0.0
    type: str = "deploy"
    protocol: int = PROTOCOL_VERSION


M = TypeVar("M")


def to_json(message: Any) -> bytes:
    return json.dumps(dataclasses.asdict(message), separators=(",", ":"), allow_nan=False).encode()


def from_json(cls: type[M], payload: bytes) -> M:
    """Parse `payload` into `cls`, checking every field's type; raises MessageError."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise MessageError("too_large", f"control message of {len(payload)} B exceeds {MAX_CONTROL_BYTES} B")
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # ValueError: also an integer of more than 4300 digits
        raise MessageError("malformed", f"not JSON: {exc}") from None
    message = _build(cls, raw, cls.__name__)
    expected_type = next(f.default for f, _ in _layout(cls) if f.name == "type")
    if getattr(message, "type", None) != expected_type:
        raise MessageError("malformed", f"expected a {expected_type!r} message")
    if getattr(message, "protocol", None) != PROTOCOL_VERSION:
        raise MessageError("version", f"protocol {message.protocol} is not {PROTOCOL_VERSION}")
    return message


@functools.cache
def _layout(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    """Each field of a message class with its resolved type (resolving them costs more than the parse)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


def _build(cls: type[M], raw: Any, where: str) -> M:
    if not isinstance(raw, dict):
        raise MessageError("malformed", f"{where} must be a JSON object")
    values: dict[str, Any] = {}
    for f, hint in _layout(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError("malformed", f"{where}.{f.name} is missing")
            continue
        values[f.name] = _check(hint, raw[f.name], f"{where}.{f.name}")
    try:
        return cls(**values)
    except ValueError as exc:  # a field's own range check (e.g. Selection's seed and threshold)
        raise MessageError("malformed", f"{where}: {exc}") from None


def _check(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise MessageError("malformed", f"{where} must be a list")
        return [_check(item, v, f"{where}[]") for v in value]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise MessageError("malformed", f"{where} must be an object")
        return {str(k): _check(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{where}: the only union used in control messages is `X | None`")
        return None if value is None else _check(options[0], value, where)
    return _check_scalar(hint, value, where)


def _check_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise MessageError("malformed", f"{where} must be {getattr(hint, '__name__', hint)}")
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer no float can hold (JSON allows any number of digits)
        return False
