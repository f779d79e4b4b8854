"""One round attempt: admission of updates and reports, the influence bounds, partial sums and the closing rule."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlite.aggregator.influence import NormBound
from fedlite.aggregator.kpis import Sketcher, cosine_to_aggregate
from fedlite.aggregator.partials import PartialSums
from fedlite.aggregator.record import RoundRecord, gate_counts
from fedlite.aggregator.validation import Rejected, RoundContext, ValidUpdate, check_update, precheck
from fedlite.protocol.codec import Limits
from fedlite.protocol.messages import DeviceReport
from fedlite.protocol.selection import Selection


@dataclass
class RoundOutcome:
    """What a closed round attempt yields: the aggregate (if complete) and its record for the history."""

    complete: bool
    aggregate: dict[str, np.ndarray] | None
    record: RoundRecord
    cosines: dict[str, float] = field(default_factory=dict)


@dataclass
class PartialBook:
    """A cluster member's bookkeeping for the updates in its partial sum (travels as JSON, `cluster.messages`)."""

    clients: list[str]
    example_counts: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    downloads: int = 0
    clipped: int = 0
    examples_capped: int = 0


@dataclass
class RemotePartial:
    """A cluster member's partial sum for one attempt (an `Aggregator` of the round's rule), its bookkeeping and its
    updates' KPI sketches."""

    aggregator: Any
    book: PartialBook
    sketches: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class _Fold:
    """An admitted update ready to fold: its capped weight and the adaptive bound it is clipped to (None: none)."""

    update: ValidUpdate
    weight: float
    clip_to: float | None


@dataclass
class RoundAttempt:
    """One attempt at one round. Thread-safe: inbox workers offer updates concurrently.

    Decoding and checking an update happen outside the lock, and so does folding it: every worker folds into a
    partial aggregate of its own (`PartialSums`), merged exactly at close. The lock covers admission only (the
    duplicate re-check, the round's bookkeeping); its condition wakes `wait` whenever an update or report
    changes what the closing rule decides. Influence bounds (see `influence`): each weight is capped at
    `max_weight`; with a `norm_reference` (None: no adaptive bound) each update is clipped to `norm_multiple`
    times its median, and with an empty reference the first `warmup` updates are held until the bound is known.
    """

    number: int
    session: str
    selected: frozenset[str]  # the aggregator's own set: eligible in its view and under the announced threshold
    deadline: float
    clients_per_round: int
    quorum: int
    context: RoundContext
    aggregator: Any  # strategies.Aggregator: add(delta, weight), fresh(), absorb(), count, result()
    limits: Limits
    started_at: float = field(default_factory=time.time)
    accepted: set[str] = field(default_factory=set)  # senders whose update was admitted (first wins)
    declined: dict[str, str] = field(default_factory=dict)
    aborted: dict[str, str] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0  # what the senders of valid updates say they received for the round
    downloads: int = 0  # how many of them said it
    clipped: int = 0
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    closed: bool = False
    sketcher: Sketcher | None = None
    sketches: dict[str, np.ndarray] = field(default_factory=dict)
    example_counts: dict[str, float] = field(default_factory=dict)
    max_weight: float = math.inf
    norm_reference: list[float] | None = None
    norm_multiple: float = 2.0
    refuse_multiple: float = 10.0  # 0: never refuse, only clip
    warmup: int = 3
    examples_capped: int = 0
    norm_flagged: list[str] = field(default_factory=list)
    refused_after_hold: list[str] = field(default_factory=list)  # held, then refused once the bound was known
    selection: Selection | None = None  # what the announcement carries (the rule that yields `selected`)
    # asynchronous rounds: an update trained on a version tau behind is scaled by staleness(tau) before it is folded
    staleness: Callable[[int], float] | None = None
    staleness_of: dict[str, int] = field(default_factory=dict)
    # asynchronous rounds: every session announced for it, and those of earlier versions whose slots are still held
    sessions: set[str] = field(default_factory=set)
    close_when_answered: bool = True  # False: only K updates or the deadline close it (more devices may be granted)
    # asynchronous rounds: updates that arrive once K are in, or after the close, wait here for the next version
    carry_over: deque[tuple[bytes, str]] | None = None
    # several aggregators (`cluster`): a member asks the coordinator before it admits an update (first claim wins
    # across the members); the coordinator books the updates its members hold in `remote` (client -> member)
    claim: Callable[[str], str] | None = None  # "" granted, else the reason it is refused
    remote: dict[str, str] = field(default_factory=dict)
    members: dict[str, int] = field(default_factory=dict)  # updates merged from each member's partial sum
    lost: int = 0  # claimed by a member whose partial sum never arrived
    _folding: int = 0  # admitted updates being folded outside the lock
    _claiming: int = 0  # updates whose claim is out (or granted and not yet admitted)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._norms: NormBound[ValidUpdate] = NormBound(self.norm_reference, self.norm_multiple,
                                                        self.refuse_multiple, self.warmup)
        self._changed = threading.Condition(self._lock)
        self._partials = PartialSums(self.aggregator)

    @property
    def norm_bound(self) -> float | None:
        """The adaptive clip bound in force (None: none, or still warming up)."""
        return self._norms.bound

    def offer(self, payload: bytes, topic_client: str) -> ValidUpdate | None:
        """Validate and fold in one update; raises Rejected (already counted) if it is refused. None: carried over
        to the next version (asynchronous rounds, the buffer is full or closed)."""
        with self._lock:
            if self.carry_over is not None and (self.closed or len(self.accepted) >= self.clients_per_round):
                self.carry_over.append((payload, topic_client))
                return None
            self.bytes_up += len(payload)
            self._refuse_early(topic_client)
        claimed = False
        try:
            update = check_update(payload, topic_client, self.context, self.limits)
            claimed = self._claim(topic_client)
        except Rejected as exc:  # a refused claim is no longer counted in `_claiming` (see `_claim`)
            with self._lock:
                self.rejected[exc.reason] += 1
            raise
        with self._changed:
            try:
                ready = self._admit_checked(payload, topic_client, update)
            finally:
                if claimed:  # admitted or refused, the claim is no longer out (`partial` waits for that)
                    self._claiming -= 1
                    self._changed.notify_all()
        if ready is None:
            return None
        self._fold_all(ready)
        return update

    def _claim(self, client: str) -> bool:
        """Several aggregators, on a member: ask the coordinator (Rejected if refused); True once granted (it is
        then counted in `_claiming` until admitted), False without a coordinator to ask."""
        if self.claim is None:
            return False
        with self._lock:
            self._claiming += 1
        try:
            refused = self.claim(client)
            if refused:
                detail = {"duplicate": f"another aggregator holds {client}'s update for round {self.number}",
                          "late": f"round {self.number} is already closed"}.get(refused, refused)
                raise Rejected(refused, detail)
        except BaseException:  # refused, or no answer: nothing of it is out any more
            with self._changed:
                self._claiming -= 1
                self._changed.notify_all()
            raise
        return True

    def _admit_checked(self, payload: bytes, topic_client: str, update: ValidUpdate) -> list[_Fold] | None:
        """Admit a checked update (lock held): what is ready to fold, or None if it is carried over."""
        if self.carry_over is not None and (self.closed or len(self.accepted) >= self.clients_per_round):
            self.carry_over.append((payload, topic_client))  # the buffer filled while this one was checked
            self.bytes_up -= len(payload)  # counted by the version that takes it
            return None
        self._refuse_early(topic_client)  # another worker may have admitted this client meanwhile
        if self._norms.refuses(update.norm):
            self.rejected["norm_outlier"] += 1
            self.norm_flagged.append(topic_client)
            raise Rejected("norm_outlier", f"update norm {update.norm:.4g} is over {self.refuse_multiple:g} x "
                           f"the median of recent norms ({self._norms.median:.4g})")
        self.accepted.add(topic_client)
        if update.bytes_down is not None:
            self.bytes_down += update.bytes_down
            self.downloads += 1
        return self._admit(update)

    def _refuse_early(self, client: str) -> None:
        """Refusals that need no decoding (lock held): a closed round, an unselected sender, a duplicate."""
        try:
            if self.closed:
                raise Rejected("late", f"round {self.number} is already closed")
            precheck(client, self.context, self.accepted)
        except Rejected as exc:
            self.rejected[exc.reason] += 1
            raise

    def _admit(self, update: ValidUpdate) -> list[_Fold]:
        """Book an accepted update (lock held) and return what is ready to fold: it, or nothing while the round's
        norm bound is not known yet (held), or every held update once the warm-up is over."""
        self.client_metrics[update.client_id] = dict(update.metrics)
        self.norms[update.client_id] = update.norm
        if self._norms.warming_up:
            return self._judge(self._norms.hold(update))
        return [self._book(update)]

    def _judge(self, released: list[ValidUpdate]) -> list[_Fold]:
        """Updates held through the warm-up, now the reference is known (lock held): refuse or book each."""
        ready: list[_Fold] = []
        for update in released:
            if self._norms.refuses(update.norm):
                self.accepted.discard(update.client_id)
                self.rejected["norm_outlier"] += 1
                self.norm_flagged.append(update.client_id)
                self.refused_after_hold.append(update.client_id)
                self.norms.pop(update.client_id, None)
                self.client_metrics.pop(update.client_id, None)
            else:
                ready.append(self._book(update))
        return ready

    def _book(self, update: ValidUpdate) -> _Fold:
        """The round's bookkeeping for one update about to be folded (lock held): its capped weight, and the
        adaptive bound it is clipped to if it exceeds it."""
        bound = self.norm_bound
        clip_to = bound if bound and update.norm > bound else None
        if clip_to is not None:
            self.norm_flagged.append(update.client_id)
        weight = float(update.num_examples)
        if weight > self.max_weight:
            weight = self.max_weight
            self.examples_capped += 1
        self.clipped += int(update.clipped or clip_to is not None)
        self.example_counts[update.client_id] = weight
        self.staleness_of[update.client_id] = self.number - update.round
        self._folding += 1
        return _Fold(update, weight, clip_to)

    def _fold_all(self, ready: list[_Fold]) -> None:
        """Fold booked updates into this thread's partial, outside the lock, then wake whoever waits (an
        admission changes the closing rule's count even when the update is held)."""
        for fold in ready:
            try:
                self._fold(fold)
            finally:
                with self._changed:
                    self._folding -= 1
                    self._changed.notify_all()
        if not ready:
            with self._changed:
                self._changed.notify_all()

    def _fold(self, fold: _Fold) -> None:
        delta = fold.update.values
        if fold.clip_to is not None:
            delta = delta.scaled(fold.clip_to / delta.norm())
        if self.staleness is not None:
            delta = delta.scaled(self.staleness(self.number - fold.update.round))
        self._partials.add(delta, fold.weight)
        if self.sketcher is not None:
            sketch = self.sketcher.sketch(delta)
            with self._lock:
                self.sketches[fold.update.client_id] = sketch

    def grant(self, devices: frozenset[str]) -> None:
        """Asynchronous rounds: more devices may send updates to this attempt (new slots)."""
        with self._changed:
            self.selected = self.selected | devices
            self.context = dataclasses.replace(self.context, selected=self.selected)

    def accept_remote(self, client: str, member: str) -> str:
        """Several aggregators: book `member`'s claim on `client`'s update: "" if granted, else why not (late: it
        is closed, not_selected, duplicate: held here or by another member)."""
        with self._changed:
            if self.closed:
                return "late"
            if client not in self.selected:
                return "not_selected"
            if client in self.accepted:
                return "duplicate"
            self.accepted.add(client)
            self.remote[client] = member
            self._changed.notify_all()
            return ""

    def seal(self) -> None:
        """Admit nothing more (several aggregators: before the members are asked for their partial sums)."""
        with self._lock:
            self.closed = True

    def absorb_remote(self, member: str, partial: RemotePartial) -> list[str]:
        """Fold a member's partial sum and its bookkeeping in; the clients it holds that were not booked to it
        are returned (the partial is refused whole then: a sum cannot be split)."""
        book = partial.book
        with self._changed:
            unbooked = [c for c in book.clients if self.remote.get(c) != member]
            if unbooked:
                return unbooked
            for client in book.clients:
                self.remote.pop(client)
            self._partials.absorb(partial.aggregator)
            self.example_counts.update(book.example_counts)
            self.norms.update(book.norms)
            self.client_metrics.update(book.client_metrics)
            self.sketches.update(partial.sketches)
            self.rejected.update(book.rejected)
            self.bytes_up += book.bytes_up
            self.bytes_down += book.bytes_down
            self.downloads += book.downloads
            self.clipped += book.clipped
            self.examples_capped += book.examples_capped
            self.members[member] = len(book.clients)
            return []

    def drop_unmerged(self) -> dict[str, list[str]]:
        """Claims whose partial sum never arrived (its member died, or was refused): no longer accepted. Returns
        them by member."""
        with self._changed:
            lost: dict[str, list[str]] = {}
            for client, member in self.remote.items():
                self.accepted.discard(client)
                lost.setdefault(member, []).append(client)
            self.lost += len(self.remote)
            self.remote.clear()
            return lost

    def announced(self, session: str) -> bool:
        """Whether a report naming `session` answers this attempt."""
        return session == self.session or session in self.sessions

    def report(self, report: DeviceReport) -> bool:
        """Record a decline or abort from a selected device; False if the report does not belong here. A report
        for another round counts when it names one of `sessions` (asynchronous rounds: a device still holding
        the slot an earlier version granted it)."""
        if report.client_id not in self.selected:
            return False
        if report.round != self.number and report.session not in self.sessions:
            return False
        with self._changed:
            if report.client_id in self.accepted:
                return False
            target = self.declined if report.kind == "declined" else self.aborted
            target[report.client_id] = report.reason
            self._changed.notify_all()
        return True

    def answered(self) -> set[str]:
        """The devices that answered: an admitted update, a decline or an abort (a copy, taken under the lock:
        the inbox's workers add to them)."""
        with self._lock:
            return self.accepted | set(self.declined) | set(self.aborted)

    def add_traffic(self, up: int = 0, down: int = 0, downloads: int = 0) -> None:
        """Count bytes that reached the attempt another way than `offer` (a secure round's stage messages)."""
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down
            self.downloads += downloads

    def _decide(self, now: float) -> str | None:
        """None while open; "complete" or "abandoned" once the closing rule says so (lock held; called at every
        admission, so it counts instead of building `answered`: a device with an admitted update cannot also
        decline or abort, see `report`)."""
        accepted = len(self.accepted)
        answered = accepted + len(self.declined.keys() | self.aborted.keys())
        if accepted >= self.clients_per_round:
            return "complete"
        if (self.close_when_answered and answered >= len(self.selected)) or now >= self.deadline:
            return "complete" if accepted >= self.quorum else "abandoned"
        return None

    def wait(self, timeout: float) -> str | None:
        """Block until the closing rule decides, the deadline passes, or `timeout` seconds: the decision, if any.

        Woken by every admission and report (no polling): the round closes as soon as its rule says so.
        """
        until = min(time.time() + max(0.0, timeout), self.deadline)
        with self._changed:
            while (decided := self._decide(time.time())) is None:
                left = until - time.time()
                if left <= 0:
                    break
                self._changed.wait(left)
            return decided

    def aggregate(self) -> dict[str, np.ndarray]:
        """The aggregate of every update folded so far, the attempt staying open (the partials are merged)."""
        with self._changed:
            self._changed.wait_for(lambda: self._folding == 0)
            return self._partials.result()

    def close(self, now: float | None = None, abandon: bool = False) -> RoundOutcome:
        """Close the attempt (`abandon`: whatever it holds, e.g. when the aggregator stops) and say why it closed:
        ``close_reason`` quorum (enough before the deadline), deadline (the quorum at the deadline) or abandoned."""
        now = now or time.time()
        with self._lock:
            self.closed = True
            ready = self._judge(self._norms.release())
        self._fold_all(ready)
        with self._changed:
            self._changed.wait_for(lambda: self._folding == 0)  # every admitted update is in a partial
            complete = not abandon and len(self.accepted) >= self.quorum and len(self.accepted) > 0
            record = self._record(complete, now)
            aggregate = self._partials.result() if complete else None
            cosines = cosine_to_aggregate(self.sketches, self.example_counts)
        return RoundOutcome(complete, aggregate, record, cosines)

    def settle(self, accepted: set[str], complete: bool) -> RoundRecord:
        """Close with what another path admitted (a secure round: the devices whose inputs the unmasked sum holds)
        and return the record."""
        with self._lock:
            self.closed = True
            self.accepted = set(accepted)
            return self._record(complete, time.time())

    def partial(self, claims_timeout: float = 10.0) -> RemotePartial:
        """Several aggregators, on a member: close, once the claims out are answered and granted ones admitted
        (at most `claims_timeout` s), and hand over what it holds, unreduced (its partial sum)."""
        with self._changed:
            self._changed.wait_for(lambda: self._claiming == 0, claims_timeout)
            self.closed = True
            ready = self._judge(self._norms.release())
        self._fold_all(ready)
        with self._changed:
            self._changed.wait_for(lambda: self._folding == 0)
            folded = set(self.example_counts)  # admitted and folded (held-then-refused ones are not)
            book = PartialBook(
                clients=sorted(folded), example_counts=dict(self.example_counts),
                norms={c: self.norms[c] for c in folded if c in self.norms},
                client_metrics={c: self.client_metrics[c] for c in folded if c in self.client_metrics},
                rejected=dict(self.rejected), bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                downloads=self.downloads, clipped=self.clipped, examples_capped=self.examples_capped)
            return RemotePartial(self._partials.merged(), book, dict(self.sketches))

    def _record(self, complete: bool, now: float) -> RoundRecord:
        """The attempt's record; the devices still silent are cut off if it closed early, else timed out."""
        early = len(self.accepted) >= self.clients_per_round or now < self.deadline
        silent = [c for c in self.selected if c not in self.accepted and c not in self.declined
                  and c not in self.aborted]
        return RoundRecord(
            round=self.number, session=self.session, status="complete" if complete else "abandoned",
            close_reason=("quorum" if early else "deadline") if complete else "abandoned",
            selected=len(self.selected), accepted=len(self.accepted), declined=len(self.declined),
            declined_by_gate=gate_counts(self.declined), aborted=len(self.aborted),
            timed_out=0 if early else len(silent), cut_off=len(silent) if early else 0,
            rejected=dict(self.rejected), clipped=self.clipped, norm_bound=self.norm_bound,
            norm_flagged=sorted(self.norm_flagged),
            norm_refused=sorted(c for c in self.norm_flagged if c not in self.accepted),
            examples_capped=self.examples_capped,
            max_weight=None if math.isinf(self.max_weight) else self.max_weight,
            examples=int(sum(self.example_counts.values())), bytes_up=self.bytes_up,
            bytes_down=self.bytes_down, downloads=self.downloads, started_at=self.started_at,
            duration_seconds=now - self.started_at, client_metrics=self.client_metrics, update_norms=self.norms,
            staleness=dict(self.staleness_of) if self.staleness is not None else {},
            aggregators=dict(self.members), lost=self.lost,
        )

