"""What the aggregator knows of the fleet: each device's last status, and who can be selected."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from fedlite.protocol.messages import DeviceStatus


@dataclass
class DeviceView:
    status: DeviceStatus
    last_seen: float


class Fleet:
    def __init__(self, status_ttl_seconds: float) -> None:
        self.ttl = status_ttl_seconds
        self._devices: dict[str, DeviceView] = {}
        self._lock = threading.Lock()

    def update(self, status: DeviceStatus, now: float | None = None) -> None:
        with self._lock:
            self._devices[status.client_id] = DeviceView(status, now or time.time())

    def eligible(self, now: float | None = None, encoding: str | None = None) -> list[str]:
        """Devices online, eligible by their own gates, heard from recently and, given an `encoding`, listing it
        among the encodings they can produce; sorted for determinism."""
        now = now or time.time()
        with self._lock:
            return sorted(
                cid for cid, view in self._devices.items()
                if view.status.state == "online" and view.status.eligible and now - view.last_seen <= self.ttl
                and (encoding is None or encoding in view.status.encodings)
            )

    def snapshot(self) -> dict[str, DeviceView]:
        with self._lock:
            return dict(self._devices)

    def has_model(self, client_id: str, model_hash: str) -> bool:
        with self._lock:
            view = self._devices.get(client_id)
            return bool(view and model_hash in view.status.cached_models)

    def counts(self, now: float | None = None) -> dict[str, int]:
        now = now or time.time()
        with self._lock:
            views = list(self._devices.values())
        fresh = [v for v in views if now - v.last_seen <= self.ttl and v.status.state != "offline"]
        return {
            "known": len(views),
            "online": len(fresh),
            "eligible": sum(1 for v in fresh if v.status.eligible and v.status.state == "online"),
            "training": sum(1 for v in fresh if v.status.state == "training"),
        }
