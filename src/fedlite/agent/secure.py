"""A device's secure-aggregation round over MQTT: the stages of `protocol.secagg.participant`, sent on its secagg
topic and received, signed by the aggregator, on its relay topic (README, "Secure aggregation")."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from fedlite.agent.stage import StageFailed
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import RelayMessage, RoundAnnouncement, SecureMessage, from_json, to_json
from fedlite.protocol.secagg import keys, masking, quantize, wire
from fedlite.protocol.secagg.participant import Participant, StageError, round_context

log = logging.getLogger("fedlite.agent")


def quantization(a: RoundAnnouncement) -> quantize.Quantization:
    p = a.secure
    assert p is not None
    plan = quantize.Quantization.of(p)
    if plan.bits != p.bits:
        raise StageFailed(f"the announced ring of {p.bits} bits does not hold {p.participants} inputs at "
                          f"{p.levels} levels")
    return plan


@dataclasses.dataclass
class SecureSession:
    """One device's part in one secure round: `share_keys` before training, `send_masked` after it."""

    announcement: RoundAnnouncement
    client_id: str
    send: Callable[[bytes], None]  # publishes on the device's secagg topic
    receive: Callable[[], bytes | None]  # the next verified relay payload (None: the round closed or timed out)
    bad: Callable[[str], None]  # counts a refused relay message or share
    sent_bytes: int = 0
    received_bytes: int = 0
    cpu_seconds: float = 0.0  # spent on the stages (keys, shares, masks), not on training or waiting

    def __post_init__(self) -> None:
        a = self.announcement
        self.plan = quantization(a)
        self.me = Participant(self.client_id, round_context(a.federation, a.run, a.round, a.session), 0, 0)
        self.alive: set[str] = set()

    def share_keys(self) -> None:
        started = time.process_time()
        try:
            self._share_keys()
        finally:
            self.cpu_seconds += time.process_time() - started

    def _share_keys(self) -> None:
        """Stages 1 and 2: advertise my keys, deal my shares to the neighbours the aggregator names, and hold
        theirs for me (shares that do not open are counted and end the round for me: the aggregator expects my
        input masked with every dealer it relayed, so I drop out and my masks are removed without me)."""
        advert = wire.advert_entry(self.me.advert())
        self._send("advertise", encryption_key=advert.encryption_key, mask_key=advert.mask_key,
                   seed_commitment=advert.seed_commitment)
        relay = self._expect("share")
        try:
            self.me.meet([wire.advert_of(e) for e in relay.neighbours], relay.points, relay.threshold)
            dealt = self.me.deal()
        except (StageError, keys.KeyError_) as exc:
            raise StageFailed(f"neighbours refused: {exc}") from None
        self._send("share", shares={c: wire.b64(blob) for c, blob in dealt.items()})
        relay = self._expect("masked")
        for dealer, blob in relay.shares.items():
            try:
                self.me.hold(dealer, wire.unb64(blob, "shares"))
            except (StageError, keys.KeyError_) as exc:
                self.bad("share")
                raise StageFailed(f"the shares relayed from {dealer} do not open: {exc}") from None
        self.alive = set(self.me.held)

    def send_masked(self, delta: np.ndarray, examples: int, rng: np.random.Generator, bytes_down: int) -> int:
        """Stages 3 and 4: my masked input, then the shares the aggregator asks for. Returns the input's bytes."""
        started = time.process_time()
        try:
            values = quantize.encode(delta, examples, self.plan, rng)
        except ValueError as exc:  # a non-finite update
            raise StageFailed(str(exc)) from None
        packed = masking.pack(self.me.masked(values, self.plan.bits, self.alive), self.plan.bits)
        self.cpu_seconds += time.process_time() - started
        self._send("masked", body=packed, length=len(values), bits=self.plan.bits,
                   bytes_down=bytes_down + self.received_bytes, cpu_seconds=self.cpu_seconds)
        relay = self._expect("unmask")
        try:
            revealed = self.me.reveal(set(relay.survivors), set(relay.dropped))
        except StageError as exc:
            raise StageFailed(f"unmasking refused: {exc}") from None
        self._send("unmask", revealed=wire.revealed_entries(revealed))
        return len(packed)

    def _send(self, stage: str, body: bytes = b"", **fields: object) -> None:
        a = self.announcement
        message = SecureMessage(client_id=self.client_id, run=a.run, round=a.round, session=a.session, stage=stage,
                                **fields)  # type: ignore[arg-type]
        payload = to_json(message) + (b"\n" + body if body else b"")
        self.sent_bytes += len(payload)
        self.send(payload)

    def _expect(self, stage: str) -> RelayMessage:
        """The relay message of `stage` for this round (others of this round end it; those of other rounds are
        stale and skipped)."""
        a = self.announcement
        while True:
            payload = self.receive()
            if payload is None:
                raise StageFailed(f"no {stage} message from the aggregator before the round closed")
            try:
                relay = from_json(RelayMessage, payload)
            except ProtocolError as exc:
                self.bad("relay")
                log.warning("round %d: ignored a malformed relay message: %s", a.round, exc)
                continue
            if (relay.run, relay.round, relay.session) != (a.run, a.round, a.session):
                continue
            self.received_bytes += len(payload)
            if relay.stage == "abort":
                raise StageFailed(f"the aggregator aborted the secure round: {relay.reason}")
            if relay.stage != stage:
                raise StageFailed(f"the aggregator moved on to the {relay.stage} stage without this device")
            return relay

