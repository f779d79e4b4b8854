"""FedBuff: devices train on the version they fetched; every `buffer_size` updates, staleness-weighted, are a step.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022. Each version is one
attempt of the round loop (committed, checkpointed and exported like a synchronous round). At most
`max_concurrency` devices hold a slot (train) at once: a version's announcement hands the free slots to eligible
devices that hold none, and a device keeps its slot across versions until its update arrives, it answers
declined or aborted, or `[rounds] deadline_seconds` pass. An update trained on a version tau steps behind counts
while tau <= `max_staleness` (else it is refused as `stale`), scaled by s(tau) (the paper's 1/sqrt(1 + tau) by
default) before the example-weighted mean: the server step is mean_i(n_i s(tau_i) delta_i) / mean_i(n_i).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np

from fedlite.aggregator.orchestrators.registry import Weights, register
from fedlite.aggregator.orchestrators.sync import HOUSEKEEPING_SECONDS, SyncRounds
from fedlite.aggregator.rounds import RoundAttempt, RoundOutcome
from fedlite.aggregator.validation import Rejected
from fedlite.protocol import selection
from fedlite.settings import Range, require

if TYPE_CHECKING:
    from fedlite.aggregator.service import Aggregator

GRANT_EVERY_SECONDS = 1.0  # free slots are handed out at most this often within a version


def sqrt_staleness(tau: int) -> float:
    """The paper's polynomial staleness weight, 1 / sqrt(1 + tau)."""
    return 1.0 / math.sqrt(1.0 + tau)


STALENESS: dict[str, Callable[[int], float]] = {"sqrt": sqrt_staleness, "constant": lambda tau: 1.0}


@dataclass
class FedBuffConfig:
    """[rounds.fedbuff]"""

    buffer_size: Annotated[int, Range(ge=1)] = 5  # updates per server step (the paper's K)
    max_concurrency: Annotated[int, Range(ge=1)] = 10  # devices training at once
    max_staleness: Annotated[int, Range(ge=1)] = 4  # versions an update may be behind
    staleness: str = "sqrt"  # the weight of a stale update: sqrt (1/sqrt(1+tau)) | constant (1)

    def validate(self) -> None:
        require(self.staleness in STALENESS, f"staleness must be one of {', '.join(STALENESS)}, not "
                f"{self.staleness!r}")
        require(self.max_concurrency >= self.buffer_size,
                f"max_concurrency must be >= buffer_size ({self.buffer_size}), not {self.max_concurrency}")


class FedBuffRounds(SyncRounds):
    """Versions made of buffered, staleness-weighted updates from devices training asynchronously."""

    def __init__(self, host: Aggregator) -> None:
        super().__init__(host)
        self.settings: FedBuffConfig = self.config.rounds.orchestrators["fedbuff"]
        self.slots: dict[str, float] = {}  # device -> when its slot lapses
        self.granted_in: dict[str, str] = {}  # device -> the session its slot was granted in
        self.carried: deque[tuple[bytes, str]] = deque()  # updates that arrived for a full or closed version

    def attempt(self, number: int, attempt: int, weights: Weights) -> RoundOutcome | None:
        host, cfg = self.host, self.config
        sent = host.downlink.publish(number, weights)
        held = frozenset(self.slots)
        round_attempt = RoundAttempt(
            number=number, session="", selected=held, selection=None,
            deadline=time.time() + cfg.rounds.deadline_seconds,
            clients_per_round=self.settings.buffer_size, quorum=1, context=self._async_context(number, held),
            limits=host.limits, aggregator=self._reducer(number), sketcher=host.sketcher,
            staleness=STALENESS[self.settings.staleness], close_when_answered=False, carry_over=self.carried,
            sessions={self.granted_in[c] for c in held if c in self.granted_in},  # their declines and aborts count
            **self._influence(held),
        )
        host.current = round_attempt
        self._replay(round_attempt)
        last_grant = 0.0
        while True:
            self._release(round_attempt)
            if time.time() - last_grant >= GRANT_EVERY_SECONDS and self._grant(round_attempt, sent):
                last_grant = time.time()
            if round_attempt.wait(HOUSEKEEPING_SECONDS) is not None:
                break
            if host.stop_event.is_set():
                host.announcer.closed(round_attempt.close(abandon=True).record)
                return None
            host.housekeeping(number, "open")
        outcome = round_attempt.close()
        self._release(round_attempt)
        host.announcer.closed(outcome.record)
        if number > 1:  # devices granted late in this version still fetch it; the one before goes
            host.downlink.withdraw(number - 1)
        host.log.info("version %d: %d updates (staleness %s), %d devices still training", number,
                      outcome.record.accepted, sorted(outcome.record.staleness.values()), len(self.slots))
        return outcome

    def _replay(self, attempt: RoundAttempt) -> None:
        """Offer the updates carried over from the previous version to this one (one version staler)."""
        for _ in range(len(self.carried)):
            payload, client = self.carried.popleft()
            try:
                attempt.offer(payload, client)
            except Rejected as exc:
                self.host.refuse("update", exc.reason, f"update from {client}: {exc}", attempt.number)

    def _release(self, attempt: RoundAttempt) -> None:
        """Slots end with the device's update, decline or abort, or when they lapse."""
        now = time.time()
        answered = attempt.answered()
        self.slots = {c: lapse for c, lapse in self.slots.items() if c not in answered and lapse > now}
        self.granted_in = {c: session for c, session in self.granted_in.items() if c in self.slots}

    def _grant(self, attempt: RoundAttempt, sent: Any) -> bool:
        """Hand the free slots to eligible devices that hold none, announced as a new session of this version."""
        free = self.settings.max_concurrency - len(self.slots)
        answered = attempt.answered()
        idle = [c for c in self.host.selectable() if c not in self.slots and c not in answered]
        if free <= 0 or not idle:
            return False
        rng = np.random.default_rng([self.config.rounds.seed, attempt.number, len(attempt.selected), 7])
        picked, rule = selection.choose(idle, min(free, len(idle)), rng.bytes(selection.SEED_BYTES).hex())
        lapse = time.time() + self.config.rounds.deadline_seconds
        self.slots |= {c: lapse for c in picked}
        attempt.grant(frozenset(picked))
        attempt.session, attempt.selection = uuid.uuid4().hex[:12], rule
        attempt.sessions.add(attempt.session)  # a device's decline or abort of any of them ends its slot
        self.granted_in |= dict.fromkeys(picked, attempt.session)
        attempt.deadline = max(attempt.deadline, lapse)
        plan = dataclasses.replace(self.config.training.plan(attempt.number), max_staleness=self.settings.max_staleness)
        self.host.announcer.open(attempt, sent, plan)
        self.host.log.info("version %d: %d devices start training (%d training)", attempt.number, len(picked),
                           len(self.slots))
        return True

    def _async_context(self, number: int, selected: frozenset[str]) -> Any:
        return dataclasses.replace(self._context(number, selected), max_staleness=self.settings.max_staleness)


register("fedbuff", FedBuffRounds, FedBuffConfig)
