"""One secure round over MQTT: devices' stage messages into the `SecureRound`, its answers out on each device's
signed relay topic, the stages' deadlines, and the unmasked sum back as the round's aggregate."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.secure_round import Refused, RoundAborted, SecureRound
from fedlite.protocol import topics
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import AdvertEntry, RelayMessage, SecureMessage, from_json, split_frame, to_json
from fedlite.protocol.secagg import masking, quantize, wire
from fedlite.protocol.secagg.participant import StageError

log = logging.getLogger("fedlite.aggregator")
TICK_SECONDS = 1.0  # housekeeping while a stage waits


@dataclass
class SecureResult:
    """What the unmasking gave: the survivors' integer sum decoded, and who is in it."""

    summed: np.ndarray  # the weighted sum of the deltas (float64, the model's flat order)
    weight: float  # the sum of the weights
    mean_norm: float  # the inputs' mean of min(|x|, 2C)
    senders: set[str]
    dropped: set[str]


@dataclass
class SecureExchange:
    """Carries one `SecureRound`: `on_message` from the inbox's workers, `run` on the orchestrator's thread."""

    federation: str
    run_id: str
    attempt: RoundAttempt  # the round's bookkeeping: selection, declines and aborts (reports), bytes, the record
    secure: SecureRound
    stage_seconds: float
    publish: Callable[[str, bytes], int]  # signs and sends (not retained); the bytes sent
    refuse: Callable[[str, str, str], None]  # (kind, reason, detail): counted in the ledger
    tick: Callable[[], None]  # housekeeping
    stopping: threading.Event
    masked_wanted: int  # close the masked stage once this many inputs are in (K)
    relay_bytes: int = 0  # what the stages sent to devices
    device_cpu: dict[str, float] = field(default_factory=dict)  # the secure stages' CPU, as each device says
    _changed: threading.Condition = field(default_factory=threading.Condition)

    # --- the inbox's workers --------------------------------------------------------------------

    def on_message(self, client: str, payload: bytes) -> None:
        head, body = split_frame(payload)
        try:
            message = from_json(SecureMessage, head)
        except ProtocolError as exc:
            self.refuse("secagg", exc.reason, f"secure message from {client}: {exc}")
            return
        problem = self._misaddressed(client, message)
        if problem:
            self.refuse("secagg", *problem)
            return
        self.attempt.add_traffic(up=len(payload))
        try:
            self._apply(client, message, body)
        except Refused as exc:
            self.refuse("secagg", exc.reason, f"{message.stage} message from {client}: {exc}")
            return
        except (StageError, ValueError) as exc:
            self.refuse("secagg", "malformed", f"{message.stage} message from {client}: {exc}")
            return
        with self._changed:
            self._changed.notify_all()

    def _misaddressed(self, client: str, m: SecureMessage) -> tuple[str, str] | None:
        if m.client_id != client:
            return "sender", f"{client} wrote a secure message for {m.client_id}"
        if m.run != self.run_id:
            return "run", f"secure message from {client} for run {m.run[:16]!r}"
        if (m.round, m.session) != (self.attempt.number, self.attempt.session):
            return "late", f"secure message from {client} for round {m.round} session {m.session[:16]!r}"
        return None

    def _apply(self, client: str, m: SecureMessage, body: bytes) -> None:
        s = self.secure
        if m.stage == "advertise":
            s.advert(client, wire.advert_of(AdvertEntry(client, m.encryption_key, m.mask_key,
                                                             m.seed_commitment)))
        elif m.stage == "share":
            s.shares(client, {c: wire.unb64(blob, "shares") for c, blob in m.shares.items()})
        elif m.stage == "masked":
            s.admits("masked", client)
            if m.bits != s.plan.bits or m.length != s.length:
                raise Refused("shape", f"{m.length} values of {m.bits} bits, not {s.length} of {s.plan.bits}")
            s.masked(client, masking.unpack(body, m.bits, m.length))
            self.device_cpu[client] = m.cpu_seconds
            self.attempt.add_traffic(down=m.bytes_down, downloads=1)
        elif m.stage == "unmask":
            s.reveal(client, wire.revealed_of(m.revealed))
        else:
            raise Refused("stage", f"unknown stage {m.stage!r}")

    # --- the orchestrator's thread ---------------------------------------------------------------

    def run(self) -> SecureResult | None:
        """The stages, each closed by its last expected message or its deadline; None when stopping. Raises
        RoundAborted (every device told) when a stage ends with too few."""
        s, a = self.secure, self.attempt
        try:
            if not self._wait(lambda: self._answered(s.adverts, s.selected) >= len(s.selected), self._stage_deadline()):
                return None
            for client, (neighbours, points, threshold) in s.close_adverts().items():
                self._relay(client, "share", threshold=threshold, points=points,
                            neighbours=[wire.advert_entry(n) for n in neighbours])
            if not self._wait(lambda: self._answered(s.dealers, s.adverts) >= len(s.adverts), self._stage_deadline()):
                return None
            for client, shares in s.close_shares().items():
                self._relay(client, "masked", shares={d: wire.b64(blob) for d, blob in shares.items()})
            if not self._wait(lambda: len(s.senders) >= self.masked_wanted
                              or self._answered(s.senders, s.dealers) >= len(s.dealers), a.deadline):
                return None
            asked = s.close_masked()
            for client, (survivors, dropped) in asked.items():
                self._relay(client, "unmask", survivors=sorted(survivors), dropped=sorted(dropped))
            if not self._wait(lambda: len(s.revealed) >= len(asked), self._stage_deadline()):
                return None
            total, count = s.unmasked()
        except RoundAborted as exc:
            self._abort_all(str(exc))
            raise
        summed, weight = quantize.decode_sum(total, s.plan, s.parameters)
        return SecureResult(summed, weight, quantize.mean_norm(total, s.plan, count), set(s.senders),
                            s.dealers - s.senders)

    def _answered(self, sent: Any, expected: Any) -> int:
        """Of the devices `expected` in a stage: those that sent its message, declined or aborted."""
        return len((set(sent) | self.attempt.answered()) & set(expected))

    def _stage_deadline(self) -> float:
        return time.time() + self.stage_seconds

    def _wait(self, done: Callable[[], bool], until: float) -> bool:
        """Until `done()` or `until`; False if the aggregator is stopping."""
        while not self._holds(done) and time.time() < until:
            if self.stopping.is_set():
                return False
            self.tick()
            with self._changed:
                self._changed.wait(min(TICK_SECONDS, max(0.0, until - time.time())))
        return not self.stopping.is_set()

    def _holds(self, done: Callable[[], bool]) -> bool:
        """`done()` with the stage machine still (the inbox's workers change it)."""
        with self.secure.lock:
            return done()

    def _relay(self, client: str, stage: str, **fields: Any) -> None:
        a = self.attempt
        message = RelayMessage(federation=self.federation, run=self.run_id, round=a.number, session=a.session,
                               stage=stage, issued_at=time.time(), **fields)
        self.relay_bytes += self.publish(topics.relay_topic(self.federation, client), to_json(message))

    def _abort_all(self, reason: str) -> None:
        told = set(self.secure.adverts) | set(self.secure.selected)
        for client in sorted(told):
            self._relay(client, "abort", reason=reason)
        log.warning("round %d: secure aggregation aborted: %s", self.attempt.number, reason)
