"""The server's stage machine for one secure-aggregation round (SecAgg+, Bell et al., CCS 2020): it takes the
devices' messages stage by stage, says what each device is to receive next, folds masked inputs into one sum as
they arrive (an input is never kept on its own) and unmasks the sum. No transport: the orchestrator carries the
messages, sets the deadlines and calls `close_*` when a stage's deadline or its last expected message arrives.

Stages: ``advertise`` (public keys) → ``share`` (encrypted shares, relayed) → ``masked`` (masked inputs, summed)
→ ``unmask`` (revealed shares) → done. A stage that ends with fewer devices than the threshold aborts the round
(`RoundAborted`); nothing of it is committed.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedlite.aggregator.secagg import UnmaskError, unmask_sum
from fedlite.protocol.secagg import graph, masking, quantize
from fedlite.protocol.secagg.participant import Advert

STAGES = ("advertise", "share", "masked", "unmask", "done")


class Refused(ValueError):
    """A device message this round does not take; `reason` becomes a counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RoundAborted(RuntimeError):
    """Too few devices survived a stage to go on (or to unmask)."""


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Devices' messages arrive on several inbox workers while the orchestrator closes stages: one at a time."""
    @functools.wraps(method)
    def run(self: SecureRound, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]


def threshold_for(neighbours: int, fraction: float) -> int:
    """t = ceil(fraction * k), at least 2 (at most k): a majority of the neighbours (fraction > 0.5) keeps a server
    that lies about who dropped out from collecting both shares of anyone."""
    return min(neighbours, max(2, math.ceil(fraction * neighbours)))


@dataclass
class SecureRound:
    context: bytes
    selected: frozenset[str]
    plan: quantize.Quantization
    seed: str  # the neighbour graph's seed (the round's session)
    length: int  # integers in a masked input: the model's parameters and the weight
    threshold_fraction: float = 0.6
    parameters: int = 0  # the model's parameters (0: length less the weight and norm, no rotation)
    neighbours_wanted: int = 0  # 0: `graph.neighbour_count`
    stage: str = "advertise"
    adverts: dict[str, Advert] = field(default_factory=dict)
    graph: dict[str, list[str]] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=dict)
    threshold: int = 0
    _sealed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # recipient -> {dealer: sealed shares}
    dealers: set[str] = field(default_factory=set)
    senders: set[str] = field(default_factory=set)
    _sum: np.ndarray | None = None
    revealed: dict[str, dict[str, tuple[int, str, bytes]]] = field(default_factory=dict)
    _asked: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)  # revealer -> (survivors, dropped)
    lock: threading.RLock = field(default_factory=threading.RLock)  # held by each stage; hold it to read the sets

    # --- stage 1: adverts -------------------------------------------------------------------------

    @_locked
    def advert(self, client: str, advert: Advert) -> None:
        self._expect("advertise", client, self.selected)
        if client in self.adverts:
            raise Refused("duplicate", f"a second advert from {client}")
        if advert.client != client:
            raise Refused("sender", f"an advert for {advert.client} from {client}")
        self.adverts[client] = advert

    @_locked
    def close_adverts(self) -> dict[str, tuple[list[Advert], dict[str, int], int]]:
        """{device: (its neighbours' adverts, every neighbour's Shamir point and its own, the threshold)}."""
        clients = sorted(self.adverts)
        k = self.neighbours_wanted or graph.neighbour_count(len(clients))
        k = min(k, len(clients) - 1)
        self.threshold = threshold_for(k, self.threshold_fraction) if k else 0
        if len(clients) < 3 or k < self.threshold:
            raise RoundAborted(f"{len(clients)} devices advertised keys; at least 3 are needed")
        self.graph = graph.neighbours(clients, self.seed, k)
        self.points = {c: i + 1 for i, c in enumerate(graph.ring(clients, self.seed))}
        self.stage = "share"
        return {c: ([self.adverts[v] for v in self.graph[c]], {v: self.points[v] for v in [*self.graph[c], c]},
                    self.threshold) for c in clients}

    # --- stage 2: shares --------------------------------------------------------------------------

    @_locked
    def shares(self, client: str, sealed: dict[str, bytes]) -> None:
        self._expect("share", client, set(self.adverts))
        if client in self.dealers:
            raise Refused("duplicate", f"a second set of shares from {client}")
        if set(sealed) != set(self.graph[client]):
            raise Refused("malformed", f"{client} dealt shares to {len(sealed)} devices, not to its "
                                       f"{len(self.graph[client])} neighbours")
        self.dealers.add(client)
        for recipient, blob in sealed.items():
            self._sealed.setdefault(recipient, {})[client] = blob

    @_locked
    def close_shares(self) -> dict[str, dict[str, bytes]]:
        """{device that dealt: the shares dealt to it by its neighbours that dealt too}; the others are out."""
        if len(self.dealers) < self.threshold + 1:
            raise RoundAborted(f"{len(self.dealers)} devices dealt their shares; {self.threshold + 1} are needed")
        self.stage = "masked"
        return {c: {d: blob for d, blob in self._sealed.get(c, {}).items() if d in self.dealers}
                for c in sorted(self.dealers)}

    # --- stage 3: masked inputs -------------------------------------------------------------------

    @_locked
    def masked(self, client: str, values: np.ndarray) -> None:
        self._expect("masked", client, self.dealers)
        if client in self.senders:
            raise Refused("duplicate", f"a second masked input from {client}")
        if len(self.senders) >= self.plan.participants:  # the ring holds this many: the stage is full
            raise Refused("late", f"masked input from {client}: {self.plan.participants} are already in")
        if values.shape != (self.length,) or (values.size and int(values.max()) >= 1 << self.plan.bits):
            raise Refused("shape", f"masked input from {client}: {values.shape}, not ({self.length},) values "
                                   f"under 2^{self.plan.bits}")
        self.senders.add(client)
        self._sum = values.astype(np.uint64) if self._sum is None else masking.add(self._sum, values, self.plan.bits)

    @_locked
    def close_masked(self) -> dict[str, tuple[set[str], set[str]]]:
        """{device that sent: (its neighbours whose self-mask shares it is to reveal, those whose mask-key shares
        it is to reveal)}: survivors sent their masked input, drop-outs dealt shares but sent none."""
        if len(self.senders) < self.threshold + 1:
            raise RoundAborted(f"{len(self.senders)} masked inputs arrived; {self.threshold + 1} are needed")
        self.stage = "unmask"
        dropped = self.dealers - self.senders
        self._asked = {c: ({v for v in self.graph[c] if v in self.senders},
                           {v for v in self.graph[c] if v in dropped}) for c in sorted(self.senders)}
        return self._asked

    # --- stage 4: unmasking -----------------------------------------------------------------------

    @_locked
    def reveal(self, client: str, shares: dict[str, tuple[int, str, bytes]]) -> None:
        self._expect("unmask", client, self.senders)
        if client in self.revealed:
            raise Refused("duplicate", f"a second reveal from {client}")
        survivors, dropped = self._asked[client]
        for owner, (point, kind, _) in shares.items():
            expected = "self" if owner in survivors else "mask" if owner in dropped else None
            if kind != expected or point != self.points[client]:
                raise Refused("malformed", f"{client} revealed a {kind} share of {owner} (asked: {expected})")
        self.revealed[client] = shares

    @_locked
    def unmasked(self) -> tuple[np.ndarray, int]:
        """(the survivors' signed integer sum, how many inputs it sums); RoundAborted if too few reveals arrived or
        the shares do not rebuild what was advertised."""
        if self._sum is None:
            raise RoundAborted("no masked input")
        dropped = self.dealers - self.senders
        try:
            total = unmask_sum(self._sum, self.plan.bits, self.context, self.threshold, self.adverts, self.graph,
                               set(self.senders), dropped, self.revealed)
        except UnmaskError as exc:
            raise RoundAborted(f"unmasking failed: {exc}") from None
        most = len(self.senders) * self.plan.levels  # each input's coordinates are in [-L, L], weight and norm [0, L]
        tail = total[-quantize.TAIL:]
        if int(np.abs(total[:-quantize.TAIL]).max(initial=0)) > most or tail.min() < 0 or tail.max() > most:
            raise RoundAborted("the unmasked sum is out of range (an input was tampered with or lost)")
        self.stage = "done"
        return total, len(self.senders)

    @_locked
    def admits(self, stage: str, client: str) -> None:
        """Refused unless `client` may send a `stage` message now (before its payload is decoded)."""
        allowed = {"advertise": self.selected, "share": set(self.adverts), "masked": self.dealers,
                   "unmask": self.senders}.get(stage, set())
        self._expect(stage, client, allowed)

    def _expect(self, stage: str, client: str, allowed: set[str] | frozenset[str]) -> None:
        if self.stage != stage:
            raise Refused("stage", f"{client} sent a {stage} message during the {self.stage} stage")
        if client not in allowed:
            raise Refused("not_selected", f"{client} is not in this round's {stage} stage")
