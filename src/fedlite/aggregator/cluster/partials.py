"""A member's partial sum on the wire: `rounds.RemotePartial` to and from a `messages.encode_partial` frame."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fedlite.aggregator.cluster.messages import PartialHeader, decode_partial, encode_partial
from fedlite.aggregator.rounds import RemotePartial
from fedlite.aggregator.strategies import fedavg
from fedlite.protocol.messages import MessageError

_SKETCH, _SUM = "sketch/", "sum/"


def _running_sum(aggregator: Any) -> fedavg.RunningSum:
    """The running sum inside a mean (or DP-mean, which wraps one) reducer."""
    return getattr(aggregator, "inner", aggregator).state


def to_frame(member: str, number: int, session: str, partial: RemotePartial, sketches: bool = True) -> bytes:
    """The frame of a member's partial sum: its sums in float32 (4 B per parameter, so it fits wherever the
    model's float32 weights frame does; the merged mean is exact to float32 resolution), counts exact; with
    `sketches` each update's KPI sketch too."""
    header = PartialHeader(member=member, round=number, session=session, book=partial.book,
                           cpu_seconds=time.process_time())
    arrays = {k: v.astype(np.float32) if k.startswith(_SUM) else v  # float32 on the wire: a model frame's size
              for k, v in fedavg.to_arrays(_running_sum(partial.aggregator)).items()}
    if sketches:
        arrays |= {_SKETCH + client: sketch for client, sketch in partial.sketches.items()}
    return encode_partial(header, arrays)


def from_frame(payload: bytes, base: Any) -> tuple[PartialHeader, RemotePartial]:
    """Decode a member's frame into a partial of `base`'s rule (a fresh one holding the sent sum); MessageError if
    it is malformed, of another layout, non-finite, or its counts disagree with its clients."""
    header, arrays = decode_partial(payload)
    sums = {k: v for k, v in arrays.items() if not k.startswith(_SKETCH)}
    for scalar in ("total_weight", "count"):
        if scalar in sums and sums[scalar].size != 1:
            raise MessageError("malformed", f"partial sum {scalar} is not one number")
        if scalar in sums:
            sums[scalar] = sums[scalar].reshape(())
    try:
        state = fedavg.from_arrays(sums)
    except ValueError as exc:
        raise MessageError("malformed", str(exc)) from None
    expected = _running_sum(base).sums
    if {k: v.shape for k, v in state.sums.items()} != {k: v.shape for k, v in expected.items()}:
        raise MessageError("shape", "partial sum of another model layout")
    if not all(np.all(np.isfinite(v)) for v in state.sums.values()) or not np.isfinite(state.total_weight):
        raise MessageError("nonfinite", "partial sum holds NaN or Inf")
    clients = header.book.clients
    if state.count != len(clients) or len(set(clients)) != len(clients):
        raise MessageError("malformed", f"partial sum of {state.count} updates lists {len(clients)} clients")
    partial = base.fresh()
    getattr(partial, "inner", partial).state = state
    sketches = {k.removeprefix(_SKETCH): v for k, v in arrays.items() if k.startswith(_SKETCH)}
    return header, RemotePartial(partial, header.book, sketches)
