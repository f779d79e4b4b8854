"""The coordinating aggregator's side of a cluster: briefs its members, grants claims, merges their partial sums."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from fedlite.aggregator.cluster.messages import Claim, ClusterBrief, Grant, M, MemberPresence, read_signed
from fedlite.aggregator.cluster.partials import from_frame
from fedlite.aggregator.inbox import Item
from fedlite.aggregator.rounds import RemotePartial, RoundAttempt
from fedlite.protocol import topics
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import to_json
from fedlite.protocol.signing import Signer

if TYPE_CHECKING:
    from fedlite.aggregator.service import Aggregator

log = logging.getLogger("fedlite.aggregator")


class ClusterCoordinator:
    """Runs inside the coordinating `Aggregator` (the lease holder) when `[cluster] member` is set."""

    def __init__(self, host: Aggregator, signer: Signer) -> None:
        self.host = host
        self.member = host.config.cluster.member
        self.federation = host.federation
        self.signer, self.verifier = signer, signer.verifier()
        self._partials: dict[str, RemotePartial] = {}  # the open attempt's, by member
        self._session = ""
        self._arrived = threading.Condition()
        self.members: set[str] = set()  # members whose presence is retained (their last will clears it)
        self.gone: set[str] = set()  # members whose presence was cleared: not waited for at close

    def subscriptions(self) -> list[str]:
        return [topics.cluster_topic(self.federation, kind, "+") for kind in ("claim", "partial", "member")]

    # --- the network thread -----------------------------------------------------------------------

    def on_message(self, topic: str, kind: str, member: str, payload: bytes) -> None:
        """A claim is answered here (small); a partial sum goes through the inbox (decoding it is model-sized)."""
        if kind == "claim":
            self._on_claim(topic, member, payload)
        elif kind == "partial":
            self.host.inbox.put(Item("partial", member, payload))
        elif kind == "member":
            self._on_presence(topic, member, payload)

    def _on_presence(self, topic: str, member: str, payload: bytes) -> None:
        if not payload:  # its last will, or a clean stop
            with self._arrived:
                gone = member in self.members
                self.members.discard(member)
                self.gone.add(member)
                self._arrived.notify_all()
            if gone:
                log.warning("aggregator %s left the federation's cluster", member)
            return
        presence = self._read(MemberPresence, topic, payload, f"presence of {member}")
        if presence is not None and presence.member == member and member not in self.members:
            with self._arrived:
                self.members.add(member)
                self.gone.discard(member)
            log.info("aggregator %s joined as a member (%d members)", member, len(self.members))

    def _read(self, cls: type[M], topic: str, payload: bytes, what: str) -> M | None:
        """A signed control message, or None after refusing it (counted by reason)."""
        try:
            return read_signed(self.verifier, cls, topic, payload)
        except ProtocolError as exc:
            self.host.refuse("cluster", exc.reason, f"{what}: {exc}")
            return None

    def _on_claim(self, topic: str, member: str, payload: bytes) -> None:
        claim = self._read(Claim, topic, payload, f"claim from {member}")
        if claim is None:
            return
        attempt = self.host.current
        refused: dict[str, str] = {}
        for client in claim.clients:
            if claim.member != member:
                refused[client] = "sender"
            elif attempt is None or claim.session != attempt.session:
                refused[client] = "late"
            elif reason := attempt.accept_remote(client, member):
                refused[client] = reason
        grant = Grant(round=claim.round, session=claim.session, batch=claim.batch, refused=refused)
        self._publish(topics.cluster_topic(self.federation, "grant", member), to_json(grant))

    # --- the inbox's workers ----------------------------------------------------------------------

    def on_partial(self, member: str, payload: bytes) -> None:
        topic = topics.cluster_topic(self.federation, "partial", member)
        attempt = self.host.current
        if attempt is None:
            return
        try:
            header, partial = from_frame(self.verifier.verify(topic, payload), attempt.aggregator)
        except ProtocolError as exc:
            self.host.refuse("cluster", exc.reason, f"partial sum from {member}: {exc}")
            return
        with self._arrived:
            if header.member != member or header.session != self._session:
                self.host.refuse("cluster", "late", f"partial sum from {member} for session {header.session[:16]!r}")
                return
            self._partials[member] = partial
            self._arrived.notify_all()

    # --- the round, from the orchestrator ---------------------------------------------------------

    def open(self, attempt: RoundAttempt) -> None:
        """Brief the members on a new attempt (retained: a member that starts later reads it)."""
        with self._arrived:
            self._session, self._partials = attempt.session, {}
        self._brief(attempt, "open")

    def gather(self, attempt: RoundAttempt) -> None:
        """Seal the attempt, ask every member for its partial sum and merge those that arrive in time; claims of
        members that do not answer are dropped (their updates are not counted)."""
        attempt.seal()
        holders = set(attempt.remote.values())
        own = len(attempt.accepted) - len(attempt.remote)
        self._brief(attempt, "closed")
        until = time.time() + self.host.config.cluster.partial_timeout_seconds
        with self._arrived:
            # a member that is gone (its last will) is not waited for: what it claimed is lost with it
            self._arrived.wait_for(lambda: holders - self.gone <= set(self._partials) or time.time() >= until,
                                   max(0.0, until - time.time()))
            arrived, self._partials = self._partials, {}
        for member, partial in sorted(arrived.items()):
            unbooked = attempt.absorb_remote(member, partial)
            if unbooked:
                self.host.refuse("cluster", "unbooked", f"partial sum from {member} holds updates it did not claim "
                                 f"({', '.join(unbooked[:5])}); refused whole", attempt.number)
        for member, clients in attempt.drop_unmerged().items():
            why = "its partial sum lacks" if member in arrived else "no partial sum from it in time for"
            log.warning("round %d: aggregator %s: %s %d updates it claimed: they are not counted", attempt.number,
                        member, why, len(clients))
        attempt.members[self.member] = own

    def _brief(self, attempt: RoundAttempt, state: str) -> None:
        brief = ClusterBrief(
            federation=self.federation, coordinator=self.member, run=self.host.run_id(),
            model_hash=self.host.model_hash, round=attempt.number, session=attempt.session, state=state,
            selected=sorted(attempt.selected), deadline=attempt.deadline,
            max_weight=None if math.isinf(attempt.max_weight) else attempt.max_weight,
            norm_reference=attempt.norm_reference, issued_at=time.time(),
        )
        self._publish(topics.cluster_topic(self.federation, "brief"), to_json(brief), retain=True)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.host.link.publish_nowait(topic, self.signer.sign(topic, payload), retain=retain)
