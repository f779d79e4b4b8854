"""One aggregator process of a cluster: a member until it holds the coordinator lease, then the coordinator (an edge
site's aggregator stays a member)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from fedlite.aggregator.cluster.lease import CoordinatorLease
from fedlite.aggregator.cluster.member import ClusterMember
from fedlite.aggregator.config import AggregatorConfig
from fedlite.protocol.signing import Signer

log = logging.getLogger("fedlite.aggregator")


class ClusterProcess:
    """`run` blocks: as a member while another process coordinates, then (after a takeover, or at once if the
    lease is free) as the coordinating `Aggregator`, which resumes from the last checkpoint in the shared
    state_dir. A site's aggregator (`[cluster] site`) is a member until stopped: the central aggregator, behind
    the site broker's bridge, coordinates. `stop` is safe from a signal handler."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.lease = CoordinatorLease(config.federation.state_dir, config.cluster.member)
        self.signer = Signer.from_file(config.signing.key_file)
        self._stopping = threading.Event()
        self._aggregator: Any = None

    def run(self) -> list[dict[str, Any]]:
        if self.config.cluster.site:
            self._serve_as_site()
            return []
        if not self.lease.try_take():
            self._serve_as_member()
        if self._stopping.is_set():
            return []
        from fedlite.aggregator.service import Aggregator

        log.info("aggregator %s coordinates federation %s", self.config.cluster.member, self.config.federation.name)
        self._aggregator = Aggregator(self.config)
        if self._stopping.is_set():
            self._aggregator.stop()
        try:
            return self._aggregator.run()
        finally:
            self.lease.release()

    def _serve_as_member(self) -> None:
        log.info("aggregator %s: %s coordinates; serving as a member", self.config.cluster.member,
                 self.lease.holder() or "another process")
        member = ClusterMember(self.config, self.signer)
        member.start()
        try:
            poll = self.config.cluster.lease_poll_seconds
            while not self._stopping.wait(poll):
                if self.lease.try_take():
                    log.warning("aggregator %s takes over coordination (the coordinator is gone)",
                                self.config.cluster.member)
                    return
        finally:
            member.stop()

    def _serve_as_site(self) -> None:
        log.info("aggregator %s: the site aggregator of federation %s; the central aggregator coordinates over the "
                 "site broker's bridge", self.config.cluster.member, self.config.federation.name)
        member = ClusterMember(self.config, self.signer)
        member.start()
        try:
            self._stopping.wait()
        finally:
            member.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self._aggregator is not None:
            self._aggregator.stop()
