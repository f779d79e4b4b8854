"""Admission of client updates: every check an uplink payload must pass before it is aggregated.

`validate_update` either returns a `ValidUpdate` or raises `Rejected` with a short reason tag for counters.
Checks run cheapest and most identity-related first. Before anything is decompressed (`precheck`): the
sender's selection and duplicates (first wins), from the topic alone (the broker ACL lets a device publish
only to its own topic, so the topic is the authenticated identity). Then the frame, within limits sized from
the model (frame, decompressed size), and its header before any tensor is decoded: kind, encoding (the round
plan's), federation, run, round (stale / future), sender (the header's client id must be the topic's), model
hash. Then the plan's codec decodes the tensors against the model's layout (names, exact sizes, code ranges,
finite scales), and the example count, value magnitude and update norm are checked. A quantized update stays
in its codes (`deltas.CodedDelta`): magnitude and norm come from the codes, and clipping scales it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlite.aggregator.deltas import Delta, as_delta
from fedlite.protocol.codec import CodecError, Header, Limits, decode
from fedlite.protocol.layout import LayoutError, check_tensors, weight_specs

NORM_POLICIES = ("clip", "reject")


class Rejected(Exception):
    """An update that is not aggregated; `reason` is a short tag, `detail` says why for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RoundContext:
    """What the aggregator knows about the open round: fixed while it is open (the attempt owns its accepted set)."""

    federation: str
    round: int
    model_hash: str
    manifest: dict[str, Any]
    selected: frozenset[str]
    max_examples: int = 1_000_000
    min_examples: int = 1
    max_update_norm: float = 0.0  # 0: no bound
    norm_policy: str = "clip"  # "clip" | "reject"
    max_abs_value: float = 1e3  # any dequantized delta entry beyond this is a giant-scale update
    run: str = ""  # the aggregator run; an update naming another run is refused ("" : not checked)
    encoding: str = "int8"  # the round plan's update encoding; an update in another is refused
    max_staleness: int = 0  # an update may answer a version this many before `round` (asynchronous rounds)

    def __post_init__(self) -> None:
        if self.norm_policy not in NORM_POLICIES:
            raise ValueError(f"norm_policy must be one of {', '.join(NORM_POLICIES)}, not {self.norm_policy!r}")
        if self.max_update_norm < 0 or not self.max_abs_value > 0:
            raise ValueError("max_update_norm must be >= 0 and max_abs_value > 0")
        if not 0 <= self.min_examples <= self.max_examples:
            raise ValueError(f"need 0 <= min_examples <= max_examples, got {self.min_examples}, {self.max_examples}")


@dataclass
class ValidUpdate:
    client_id: str
    values: Delta  # already clipped when the norm policy is "clip"
    num_examples: int
    metrics: dict[str, float]
    norm: float  # L2 norm before clipping
    clipped: bool
    bytes: int
    bytes_down: int | None = None  # what the device says it received for the round (None: it did not say)
    round: int = 0  # the version it was trained from (the open round, or an earlier one in asynchronous rounds)

    @property
    def delta(self) -> dict[str, np.ndarray]:
        """The delta as float32 arrays (expanded from its codes: for inspection, not for the round's path)."""
        return self.values.dense()


def validate_update(payload: bytes, topic_client_id: str, ctx: RoundContext, limits: Limits = Limits(),
                    accepted: Collection[str] = frozenset()) -> ValidUpdate:
    """Decode and check one uplink payload from a sender not yet in `accepted`; pure (nothing is changed)."""
    precheck(topic_client_id, ctx, accepted)
    return check_update(payload, topic_client_id, ctx, limits)


def precheck(topic_client_id: str, ctx: RoundContext, accepted: Collection[str] = frozenset()) -> None:
    """The checks that need only the topic: run before a payload is decompressed or parsed."""
    if topic_client_id not in ctx.selected:
        raise Rejected("unselected", f"client {topic_client_id!r} was not selected for round {ctx.round}")
    if topic_client_id in accepted:
        raise Rejected("duplicate", f"client {topic_client_id!r} already has an accepted update in round {ctx.round}")


def check_header(header: Header, topic_client_id: str, ctx: RoundContext) -> None:
    """The header's checks, run before the tensors are decoded; raises Rejected."""
    if header.kind != "update":
        raise Rejected("kind", f"expected an update, got kind {header.kind!r} encoding {header.encoding!r}")
    if header.encoding != ctx.encoding:
        raise Rejected("encoding", f"update encoded as {header.encoding!r}, the round's plan says {ctx.encoding!r}")
    if header.federation != ctx.federation:
        raise Rejected("federation", f"update for federation {header.federation!r}, this is {ctx.federation!r}")
    if ctx.run and header.run != ctx.run:
        raise Rejected("run", f"update for run {header.run[:16]!r}, this run is {ctx.run[:16]!r}")
    if header.round < ctx.round - ctx.max_staleness:
        raise Rejected("stale", f"update for round {header.round}, the open round is {ctx.round}"
                       + (f" (at most {ctx.max_staleness} behind)" if ctx.max_staleness else ""))
    if header.round > ctx.round:
        raise Rejected("future", f"update for round {header.round}, the open round is {ctx.round}")
    if header.client_id != topic_client_id:
        raise Rejected("sender", f"header says client {header.client_id!r} but it came on {topic_client_id!r}'s topic")
    if header.model_hash != ctx.model_hash:
        raise Rejected("model_hash", f"update is for model {header.model_hash[:16]!r}, the round uses "
                       f"{ctx.model_hash[:16]!r}")


def check_update(payload: bytes, topic_client_id: str, ctx: RoundContext, limits: Limits = Limits()) -> ValidUpdate:
    """Decode and check one uplink payload against the round; pure (``ctx`` is not changed)."""
    size = len(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else 0
    try:
        message = decode(payload, limits=limits, shapes=weight_specs(ctx.manifest), codes=True,
                         check_header=lambda header: check_header(header, topic_client_id, ctx))
    except CodecError as exc:
        raise Rejected(exc.reason, exc.detail) from None
    except Rejected:
        raise
    except Exception as exc:  # a bug in the decoder must not let one payload crash the round
        raise Rejected("malformed", f"decoder failed: {type(exc).__name__}: {exc}") from None
    header = message.header
    try:
        check_tensors(message.tensors, ctx.manifest)
    except LayoutError as exc:
        raise Rejected(exc.reason, exc.detail) from None
    if not ctx.min_examples <= header.num_examples <= ctx.max_examples:
        raise Rejected("examples", f"num_examples {header.num_examples} is outside "
                       f"[{ctx.min_examples}, {ctx.max_examples}]")
    delta = as_delta(message.tensors)
    largest = 0.0 if delta.max_abs_bound() <= ctx.max_abs_value else delta.max_abs()  # exact only when needed
    if not largest <= ctx.max_abs_value:
        raise Rejected("magnitude", f"a delta entry of magnitude {largest:.3g} exceeds {ctx.max_abs_value:.3g}")
    norm, clipped = delta.norm(), False
    if ctx.max_update_norm > 0 and norm > ctx.max_update_norm:
        if ctx.norm_policy == "reject":
            raise Rejected("norm", f"update norm {norm:.4g} exceeds {ctx.max_update_norm:.4g}")
        delta = delta.scaled(ctx.max_update_norm / norm)
        clipped = True
    problem = check_metrics(header.metrics)
    if problem:
        raise Rejected("metrics", problem)
    metrics = {key: float(value) for key, value in header.metrics.items()}
    received = header.extra.get("bytes_down")
    if received is not None and not (type(received) is int and 0 <= received <= MAX_BYTES_DOWN):
        raise Rejected("header", f"extra.bytes_down must be an integer in [0, {MAX_BYTES_DOWN}]")
    return ValidUpdate(topic_client_id, delta, header.num_examples, metrics, norm, clipped, size, received,
                       header.round)


MAX_BYTES_DOWN = 1 << 40  # a device's downlink bytes for one round beyond this are not a measurement


MAX_METRIC = 1e12  # any reported metric beyond this magnitude is not a measurement


def check_metrics(metrics: dict[str, float]) -> str | None:
    """Why device-reported metrics cannot be used (None: they can): accuracies in [0, 1], losses >= 0, all bounded.

    Metrics feed the KPIs, the fairness view and the rollout's promotion rule, so a device must not be able
    to move them with an impossible number (e.g. an accuracy of 1e308).
    """
    for name, value in metrics.items():
        value = float(value)
        if not abs(value) <= MAX_METRIC:
            return f"metric {name!r} = {value:.3g} is out of range"
        if "accuracy" in name and not 0.0 <= value <= 1.0:
            return f"metric {name!r} = {value:.3g} is not an accuracy in [0, 1]"
        if "loss" in name and value < 0:
            return f"metric {name!r} = {value:.3g} is a negative loss"
    return None
