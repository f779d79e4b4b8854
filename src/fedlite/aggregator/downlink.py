"""What goes down each round: the full weights (retained, for newcomers) and the delta from the previous round's.

The devices train on the *reference* weights: round r's are round r - 1's plus the decoded delta of round r
(`protocol.downlink`), so what the codec leaves out of one delta is carried into the next (error feedback on the
server side), and a device that applies the chain holds exactly the weights a newcomer downloads. The retained
deltas are kept while their total size is below one full copy: a device further behind downloads the full one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlite.aggregator.retained import RetainedTopics
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, decode, encode_delta, encode_weights
from fedlite.protocol.downlink import delta_limits, digest, step_of
from fedlite.protocol.layout import flatten, unflatten, weight_specs

log = logging.getLogger("fedlite.aggregator")
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class RoundWeights:
    """What one round's announcement says about its weights, and what they cost on the wire."""

    topic: str
    digest: str  # "" when the full copy is lossy (not float32)
    delta_base: int  # deltas to this round start after round `delta_base` (0: none)
    full_bytes: int
    delta_bytes: int  # this round's delta frame (0: none)


@dataclass
class Downlink:
    """The reference weights devices hold, the retained chain of deltas, and the full copy of each round."""

    federation: str
    model_hash: str
    manifest: dict[str, Any]
    retained: RetainedTopics
    run_id: Callable[[], str]
    dtype: str = "float32"
    delta_encoding: str = "int8"  # "none": full weights only
    reference: np.ndarray | None = None
    round: int = 0
    chain: list[tuple[int, int]] = field(default_factory=list)  # (round, frame bytes) of retained deltas
    _published: RoundWeights | None = None

    def publish(self, number: int, weights: Weights) -> RoundWeights:
        """Retain round `number`'s full weights (and its delta, once per round); what to announce about them."""
        delta_bytes = 0
        if self.delta_encoding == "none" or self.reference is None or number != self.round + 1:
            if number != self.round or self.reference is None:
                self._restart(number, weights)
        else:
            delta_bytes = self._advance(number, weights)
        if self._published is not None and self._published.topic == topics.weights_topic(self.federation, number):
            delta_bytes = delta_bytes or self._published.delta_bytes
        full = encode_weights(unflatten(self.reference, self.manifest), self._header("weights", number),
                              dtype=self.dtype)
        topic = topics.weights_topic(self.federation, number)
        self.retained.broadcast(topic, full)
        self._trim(len(full))
        base = self.chain[0][0] - 1 if self.chain else 0
        self._published = RoundWeights(topic, digest(self.reference) if self.dtype == "float32" else "", base,
                                       len(full), delta_bytes)
        return self._published

    def withdraw(self, number: int) -> None:
        """The attempt is over: the full copy leaves the broker (deltas stay for the next rounds)."""
        self.retained.clear(topics.weights_topic(self.federation, number))

    def finish(self) -> None:
        """The run is over: every retained delta leaves the broker."""
        for number, _ in self.chain:
            self.retained.clear(topics.delta_topic(self.federation, number))
        self.chain.clear()

    def _restart(self, number: int, weights: Weights) -> None:
        """A new chain from these weights (the first round this process sends, or a gap in the rounds)."""
        self.finish()
        self.reference = flatten(weights, self.manifest)
        self.round = number

    def _advance(self, number: int, weights: Weights) -> int:
        """Encode the step from the reference to `weights`, publish it, and move the reference by what it decodes to."""
        assert self.reference is not None
        step = unflatten(flatten(weights, self.manifest) - self.reference, self.manifest)
        frame = encode_delta(step, self._header("delta", number), encoding=self.delta_encoding,
                             base_round=number - 1)
        decoded = decode(frame, limits=delta_limits(self.manifest), shapes=weight_specs(self.manifest))
        self.reference = np.add(self.reference, step_of(decoded, self.manifest), dtype=np.float32)
        self.round = number
        self.retained.broadcast(topics.delta_topic(self.federation, number), frame)
        self.chain.append((number, len(frame)))
        return len(frame)

    def _trim(self, full_bytes: int) -> None:
        """Drop the oldest deltas while the chain costs more than one full copy."""
        while self.chain and sum(size for _, size in self.chain) > full_bytes:
            number, _ = self.chain.pop(0)
            self.retained.clear(topics.delta_topic(self.federation, number))

    def _header(self, kind: str, number: int) -> Header:
        return Header(kind=kind, federation=self.federation, round=number, model_hash=self.model_hash,
                      run=self.run_id())
