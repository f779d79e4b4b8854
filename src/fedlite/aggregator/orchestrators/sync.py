"""Synchronous rounds: select K(1 + over-selection) eligible devices, announce, close at K, quorum or deadline."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlite.aggregator.attempt_setup import round_context, round_reducer
from fedlite.aggregator.influence import reference_norms, weight_cap
from fedlite.aggregator.orchestrators.registry import Weights, register
from fedlite.aggregator.rounds import RoundAttempt, RoundOutcome
from fedlite.aggregator.select import select
from fedlite.aggregator.validation import RoundContext
from fedlite.protocol.selection import Selection

if TYPE_CHECKING:
    from fedlite.aggregator.service import Aggregator

HOUSEKEEPING_SECONDS = 1.0  # the watchdog, the retained topics and fleet.json, while a round waits


class SyncRounds:
    """McMahan et al.'s synchronous round: every attempt waits for its devices, then closes on the rule."""

    def __init__(self, host: Aggregator) -> None:
        self.host = host
        self.config = host.config

    def attempt(self, number: int, attempt: int, weights: Weights) -> RoundOutcome | None:
        picked = self._wait_and_select(number, attempt)
        if picked is None:
            return None
        return self._collect(number, *picked, weights)

    def _wait_and_select(self, number: int, attempt: int) -> tuple[frozenset[str], Selection] | None:
        host, r = self.host, self.config.rounds
        want = int(np.ceil(r.clients_per_round * (1 + r.over_selection)))
        started, last_log = time.time(), 0.0
        while not host.stop_event.is_set():
            host.housekeeping(number, "waiting")
            eligible = host.selectable()
            waited = time.time() - started
            # over-selection asks for more than K; once K are eligible and so is every device ever heard from,
            # waiting for more is waiting for nobody (every device wanted, or a fleet smaller than K(1 + over-sel.))
            nobody_else = len(eligible) >= r.clients_per_round and len(eligible) >= host.fleet.counts()["known"]
            if len(eligible) >= want or nobody_else or (waited >= r.wait_for_devices_seconds
                                                        and len(eligible) >= r.min_accepted):
                rng = np.random.default_rng([r.seed, number, attempt])
                return select(eligible, r.clients_per_round, r.over_selection, rng)
            if time.time() - last_log > 10:
                host.log.info("round %d: waiting for eligible devices (%d of %d)", number, len(eligible), want)
                last_log = time.time()
            host.stop_event.wait(0.1)  # statuses arrive on the network thread; eligibility is re-read
        return None

    def _collect(self, number: int, selected: frozenset[str], selection: Selection,
                 weights: Weights) -> RoundOutcome | None:
        host, cfg = self.host, self.config
        attempt = self._attempt(number, selected, selection, sketcher=host.sketcher, **self._influence(selected))
        sent = host.downlink.publish(number, weights)
        host.current = attempt
        if host.cluster is not None:
            host.cluster.open(attempt)
        host.announcer.open(attempt, sent)
        host.log.info("round %d: selected %d devices, deadline in %.0f s", number, len(selected),
                      cfg.rounds.deadline_seconds)
        while attempt.wait(HOUSEKEEPING_SECONDS) is None:  # woken by every admission and report
            if host.stop_event.is_set():
                host.announcer.closed(attempt.close(abandon=True).record)  # stopping: nobody collects it
                return None
            host.housekeeping(number, "open")
        if host.cluster is not None:
            host.cluster.gather(attempt)
        outcome = attempt.close()
        host.announcer.closed(outcome.record)
        for client in attempt.refused_after_hold:  # refused once the warm-up fixed the norm bound
            host.refuse("update", "norm_outlier", f"update from {client}: its norm is an outlier", number)
        host.downlink.withdraw(number)
        return outcome

    def _attempt(self, number: int, selected: frozenset[str], selection: Selection, **bounds: Any) -> RoundAttempt:
        """A new attempt at round `number` for the devices `selected` (a new session, the round's deadline)."""
        cfg = self.config
        return RoundAttempt(
            number=number, session=uuid.uuid4().hex[:12], selected=selected, selection=selection,
            deadline=time.time() + cfg.rounds.deadline_seconds, clients_per_round=cfg.rounds.clients_per_round,
            quorum=cfg.rounds.min_accepted, context=self._context(number, selected), limits=self.host.limits,
            aggregator=self._reducer(number), **bounds,
        )

    def _influence(self, selected: frozenset[str]) -> dict[str, Any]:
        """The round's bounds on one device's influence (see `influence`): weight cap and adaptive norm bound."""
        s = self.config.server
        advertised = [view.status.num_examples for cid, view in self.host.fleet.snapshot().items() if cid in selected]
        bounds: dict[str, Any] = {"max_weight": weight_cap(advertised, s.example_multiple, s.max_examples)}
        if s.norm_multiple > 0 and not self.config.privacy.enabled:  # DP clips every update to S already
            bounds |= {"norm_reference": reference_norms(self.host.history, s.norm_window),
                       "norm_multiple": s.norm_multiple, "refuse_multiple": s.norm_refuse_multiple,
                       "warmup": s.norm_warmup}
        return bounds

    def _reducer(self, number: int) -> Any:
        return round_reducer(self.config, self.host.specs, number)

    def _context(self, number: int, selected: frozenset[str]) -> RoundContext:
        return round_context(self.config, self.host.manifest, number, selected, self.host.run_id())


def _make(host: Aggregator) -> SyncRounds:
    """Synchronous rounds, secure ones under [secure_aggregation] enabled (same selection, another collection)."""
    if host.config.secure_aggregation.enabled:
        from fedlite.aggregator.orchestrators.secure import SecureRounds

        return SecureRounds(host)
    return SyncRounds(host)


register("sync", _make)
