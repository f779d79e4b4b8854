"""A cluster member that does not coordinate: checks and folds its share of the updates, hands its sum over.

It follows the coordinator's signed brief (`messages.ClusterBrief`): for each open attempt it opens an attempt of
its own with the same context, claims every update before admitting it, and when the brief says ``closed``
publishes its partial sum. The manifest comes from the retained (signed) model topic, like a device's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fedlite.aggregator.attempt_setup import round_context, round_reducer
from fedlite.aggregator.bootstrap import broker_settings, client_id
from fedlite.aggregator.cluster.claims import ClaimBatcher
from fedlite.aggregator.cluster.messages import Claim, ClusterBrief, Grant, M, MemberPresence, read_signed
from fedlite.aggregator.cluster.partials import to_frame
from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.inbox import Inbox, Item
from fedlite.aggregator.kpis import Sketcher
from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.metrics import Metrics
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.validation import Rejected
from fedlite.protocol import topics
from fedlite.protocol.codec import Limits, read_header, update_limits
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import num_params, weight_specs
from fedlite.protocol.messages import to_json
from fedlite.protocol.signing import Signer
from fedlite.protocol.transport import Link, PayloadTooLarge

log = logging.getLogger("fedlite.aggregator")

MODEL_HEADER_LIMITS = Limits(max_payload_bytes=1 << 31)  # the retained model frame: only its header is read


class ClusterMember:
    """One member's share of the work, until `stop` (it takes over coordination elsewhere: `cluster.run`)."""

    def __init__(self, config: AggregatorConfig, signer: Signer, workers: int = 2) -> None:
        self.config, self.signer, self.verifier = config, signer, signer.verifier()
        self.federation, self.member = config.federation.name, config.cluster.member
        self.metrics = Metrics(self.federation)
        self.ledger = Ledger(self.metrics)
        self.manifests: dict[str, dict[str, Any]] = {}
        self.current: RoundAttempt | None = None
        self._waiting: tuple[str, bytes] | None = None  # an open brief whose model has not arrived: (hash, brief)
        self._claims: tuple[str, ClaimBatcher] | None = None  # the open attempt's session and its claims
        self._briefs = threading.Condition()  # briefs queued and not yet applied: updates after them wait
        self._briefs_queued = 0
        self.inbox = Inbox(self._handle, self._busy, workers=workers)
        presence = topics.cluster_topic(self.federation, "member", self.member)
        self._presence = presence, self.signer.sign(presence, to_json(MemberPresence(
            federation=self.federation, member=self.member, started_at=time.time())))
        self.link = Link(broker_settings(config), client_id(config), self._on_message, will=(presence, b""),
                         on_connect=self._announce)

    def start(self) -> None:
        fed, share = self.federation, self.config.broker.share_group
        self.inbox.start()
        self.link.subscribe(f"{topics.ROOT}/{fed}/model/+")
        self.link.subscribe(topics.cluster_topic(fed, "brief"))
        self.link.subscribe(topics.cluster_topic(fed, "grant", self.member))
        self.link.subscribe(topics.all_updates(fed, share))
        self.link.connect()
        log.info("aggregator %s: a member of federation %s (share group %s), coordinated elsewhere", self.member,
                 fed, share)

    def _announce(self) -> None:
        """After every (re)connect: say this member is up (its last will says when it is gone)."""
        self.link.publish_nowait(*self._presence, retain=True)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.link.publish(self._presence[0], b"", retain=True, timeout=2)
        self.link.close()
        self.inbox.stop()

    # --- the network thread -----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        cluster = topics.parse_cluster(topic)
        if cluster is not None:
            if cluster[1] == "brief":
                self._queue_brief(payload)  # opening an attempt, or closing one, is not for here
            elif cluster[1] == "grant":
                self._on_grant(topic, payload)
            return
        parsed = topics.parse(topic)
        if parsed is None or parsed[0] != self.federation:
            return
        if parsed[1] == "updates":
            self.metrics.update_received(len(payload))
            self.inbox.put(Item("update", parsed[2], payload))
        elif parsed[1] == "model" and payload:
            self._on_model(topic, payload)

    def _read(self, cls: type[M], topic: str, payload: bytes, what: str) -> M | None:
        """A signed control message, or None after refusing it (counted by reason)."""
        try:
            return read_signed(self.verifier, cls, topic, payload)
        except ProtocolError as exc:
            self.ledger.refuse("cluster", exc.reason, None, f"{what}: {exc}")
            return None

    def _on_model(self, topic: str, payload: bytes) -> None:
        try:
            header = read_header(self.verifier.verify(topic, payload), limits=MODEL_HEADER_LIMITS)
        except ProtocolError as exc:
            self.ledger.refuse("cluster", exc.reason, None, f"model on {topic}: {exc}")
            return
        manifest = header.extra.get("manifest")
        if isinstance(manifest, dict) and manifest.get("model_hash") == header.model_hash:
            self.manifests[header.model_hash] = manifest
            waiting = self._waiting
            if waiting is not None and waiting[0] == header.model_hash:  # the brief came first: open it now
                self._waiting = None
                self._queue_brief(waiting[1])

    def _queue_brief(self, payload: bytes) -> None:
        """Into the inbox; an update that arrives after it is checked only once it is applied (the inbox has
        several workers, and a round's first updates follow its brief closely)."""
        with self._briefs:
            self._briefs_queued += 1
        self.inbox.put(Item("brief", "", payload))

    def _brief_done(self) -> None:
        with self._briefs:
            self._briefs_queued -= 1
            self._briefs.notify_all()

    def _on_grant(self, topic: str, payload: bytes) -> None:
        grant = self._read(Grant, topic, payload, "grant")
        claims = self._claims
        if grant is not None and claims is not None and claims[0] == grant.session:
            claims[1].answer(grant.batch, grant.refused)

    # --- the inbox's workers ----------------------------------------------------------------------

    def _busy(self, item: Item) -> None:
        if item.kind == "brief":
            self._brief_done()
        self.ledger.refuse(item.kind, "busy", None, f"{item.kind} from {item.client}: the inbox is full")

    def _handle(self, item: Item) -> None:
        if item.kind == "brief":
            try:
                self._on_brief(item.payload)
            finally:
                self._brief_done()
            return
        with self._briefs:
            self._briefs.wait_for(lambda: self._briefs_queued == 0, self.config.cluster.claim_timeout_seconds)
        attempt = self.current
        if attempt is None:
            self.ledger.refuse("update", "late", None, f"update from {item.client} before any round")
            return
        try:
            attempt.offer(item.payload, item.client)
        except Rejected as exc:
            self.ledger.refuse("update", exc.reason, attempt.number, f"update from {item.client}: {exc}")

    def _on_brief(self, payload: bytes) -> None:
        brief = self._read(ClusterBrief, topics.cluster_topic(self.federation, "brief"), payload, "brief")
        if brief is None or brief.federation != self.federation:
            return
        current = self.current
        if brief.state == "open" and (current is None or current.session != brief.session):
            self._open(brief, payload)
        elif brief.state == "closed" and current is not None and current.session == brief.session:
            self._hand_over(current)

    def _open(self, brief: ClusterBrief, payload: bytes) -> None:
        manifest = self.manifests.get(brief.model_hash)
        if manifest is None:  # retained messages arrive in no set order: the model may follow its brief
            self._waiting = (brief.model_hash, payload)
            if brief.model_hash not in self.manifests:  # (or it came just now: then it is opened here)
                log.info("round %d: waiting for model %s before checking updates", brief.round,
                         brief.model_hash[:12])
                return
            self._waiting, manifest = None, self.manifests[brief.model_hash]
        specs = weight_specs(manifest)
        selected = frozenset(brief.selected)
        base = Limits(max_payload_bytes=self.config.server.max_update_bytes)
        limits = update_limits([tuple(s) for _, s in specs], base, self.config.training.encoding)
        bounds: dict[str, Any] = {}
        if brief.max_weight is not None:
            bounds["max_weight"] = brief.max_weight
        s = self.config.server
        if brief.norm_reference is not None:
            bounds |= {"norm_reference": brief.norm_reference, "norm_multiple": s.norm_multiple,
                       "refuse_multiple": s.norm_refuse_multiple, "warmup": s.norm_warmup}
        self.current = RoundAttempt(
            number=brief.round, session=brief.session, selected=selected, deadline=brief.deadline,
            clients_per_round=len(selected), quorum=0,
            context=round_context(self.config, manifest, brief.round, selected, brief.run), limits=limits,
            aggregator=round_reducer(self.config, specs, brief.round), sketcher=Sketcher(num_params(manifest)),
            claim=self._claimer(brief), **bounds,
        )
        log.info("round %d: checking this aggregator's share of the updates (session %s)", brief.round,
                 brief.session)

    def _claimer(self, brief: ClusterBrief) -> Callable[[str], str]:
        topic = topics.cluster_topic(self.federation, "claim", self.member)

        def send(batch: int, clients: list[str]) -> None:
            message = Claim(member=self.member, round=brief.round, session=brief.session, batch=batch,
                            clients=clients)
            self.link.publish_nowait(topic, self.signer.sign(topic, to_json(message)))

        claims = ClaimBatcher(send, self.config.cluster.claim_timeout_seconds)
        self._claims = (brief.session, claims)

        def claim(client: str) -> str:
            try:
                return claims.ask(client)
            except TimeoutError as exc:
                raise Rejected("busy", f"the coordinator did not answer: {exc}") from None

        return claim

    def _hand_over(self, attempt: RoundAttempt) -> None:
        partial = attempt.partial(self.config.cluster.claim_timeout_seconds)
        topic = topics.cluster_topic(self.federation, "partial", self.member)
        # a site sends one sum across its bridge, not a KPI sketch per device (README, Edge sites)
        sketches = not self.config.cluster.site
        signed = self.signer.sign(topic, to_frame(self.member, attempt.number, attempt.session, partial,
                                                  sketches=sketches))
        try:
            self.link.check_size(topic, signed)
        except PayloadTooLarge:  # many updates' sketches beyond the broker's packet limit: the sum alone fits
            if not sketches:
                raise
            log.warning("round %d: the %d updates' KPI sketches do not fit one packet; sending the sum without "
                        "them (their cosine KPIs are missing)", attempt.number, len(partial.book.clients))
            signed = self.signer.sign(topic, to_frame(self.member, attempt.number, attempt.session, partial,
                                                      sketches=False))
        self.link.publish(topic, signed)
        log.info("round %d: partial sum of %d updates handed to the coordinator (%d B)", attempt.number,
                 len(partial.book.clients), len(signed))
