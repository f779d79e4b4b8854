"""What the aggregator knows of the fleet: each device's last status, and who can be selected."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from fedlite.protocol.messages import DeviceStatus


@dataclass
class DeviceView:
    status: DeviceStatus
    last_seen: float  # the status's own updated_at, never later than its arrival: when the device was last heard of
    received_at: float  # when the aggregator received it (a retained copy arrives on every (re)subscription)


class Fleet:
    """Devices by their last status. A status is fresh for `status_ttl_seconds` from its own `updated_at`, not from
    its arrival: a retained status the broker delivers on a (re)subscription is as old as it says, and a device's
    clock running ahead cannot make it fresh for longer than from the moment it arrived."""

    def __init__(self, status_ttl_seconds: float) -> None:
        self.ttl = status_ttl_seconds
        self._devices: dict[str, DeviceView] = {}
        self._lock = threading.Lock()

    def update(self, status: DeviceStatus, now: float | None = None) -> None:
        received = now or time.time()
        with self._lock:
            self._devices[status.client_id] = DeviceView(status, min(status.updated_at, received), received)

    def fresh(self, view: DeviceView, now: float | None = None) -> bool:
        return (now or time.time()) - view.last_seen <= self.ttl

    def eligible(self, now: float | None = None, encoding: str | None = None) -> list[str]:
        """Devices online, eligible by their own gates, heard from recently and, given an `encoding`, listing it
        among the encodings they can produce; sorted for determinism."""
        now = now or time.time()
        with self._lock:
            return sorted(
                cid for cid, view in self._devices.items()
                if view.status.state == "online" and view.status.eligible and self.fresh(view, now)
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
        fresh = [v for v in views if self.fresh(v, now) and v.status.state != "offline"]
        return {
            "known": len(views),
            "online": len(fresh),
            "eligible": sum(1 for v in fresh if v.status.eligible and v.status.state == "online"),
            "training": sum(1 for v in fresh if v.status.state == "training"),
        }
