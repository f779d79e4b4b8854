"""Simulated device life for the demo: busy users, unplugged chargers, metered links, stragglers, a vanishing device."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedlite.demo.cluster import LocalFederation
from fedlite.protocol.selection import Selection, is_selected

SLOWDOWN = 5.0  # a straggler trains this many times slower than the others


@dataclass(frozen=True)
class DeviceRole:
    """How one simulated device behaves over time (period in seconds; phase shifts devices apart)."""

    kind: str  # steady | busy | battery | metered | vanishing | slow
    period: float = 6.0
    phase: float = 0.0

    def state(self, elapsed: float) -> dict:
        """The device state at `elapsed` seconds into the run (vanishing devices are handled apart)."""
        on = ((elapsed + self.phase) // (self.period / 2)) % 2 == 1
        if self.kind == "busy" and on:
            return {"cpu_percent": 78.0, "load_per_cpu": 1.4}
        if self.kind == "battery" and on:
            return {"plugged_in": False, "battery_percent": 64.0}
        if self.kind == "metered" and on:
            return {"interfaces_up": ["lo", "wwan0"]}
        if self.kind == "slow":
            return {"slowdown": SLOWDOWN}
        return {}


def assign_roles(devices: list[str], stragglers: int = 0, realistic: bool = True) -> dict[str, DeviceRole]:
    """Most devices steady; two busy, one on battery at times, one on a metered link, one that vanishes (none of
    these unless `realistic`); and `stragglers` of the steady ones `SLOWDOWN` times slower."""
    kinds = ["busy", "battery", "busy", "metered", "vanishing"] if realistic else []
    roles = {device: DeviceRole("steady") for device in devices}
    for i, (device, kind) in enumerate(zip(devices[1::2], kinds, strict=False)):
        roles[device] = DeviceRole(kind, period=5.0 + i, phase=1.3 * i)
    steady = [d for d in devices if roles[d].kind == "steady"]
    for device in steady[:stragglers]:
        roles[device] = DeviceRole("slow")
    return roles


class Scenario:
    """Rewrites the simulated state files twice a second; the agents read them through their real gates."""

    def __init__(self, fed: LocalFederation, roles: dict[str, DeviceRole], base: dict | None = None) -> None:
        self.fed = fed
        self.roles = roles
        self.base = base or {}  # every device's state besides its role's (e.g. its simulated batch time)
        self.started = time.time()
        self._stop = threading.Event()
        self._last: dict[str, dict] = {}
        self._thread = threading.Thread(target=self._loop, name="scenario", daemon=True)

    def start(self) -> Scenario:
        self._apply()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._apply()

    def _apply(self) -> None:
        elapsed = time.time() - self.started
        for device, role in self.roles.items():
            state = self.base | role.state(elapsed)
            if state != self._last.get(device):
                self.fed.set_device_state(device, **state)
                self._last[device] = state


class Vanisher:
    """Kills a device's agent (power loss) as soon as a round selects it, and brings it back later."""

    def __init__(self, fed: LocalFederation, device: str, restart: Callable[[], None], at_round: int,
                 back_after_rounds: int = 2, say: Callable[[str], None] = print) -> None:
        self.fed, self.device, self.restart, self.say = fed, device, restart, say
        self.at_round, self.back_at = at_round, at_round + back_after_rounds
        self.vanished_in: int | None = None
        self.returned = False

    def on_round(self, round_number: int, selection: Selection) -> None:
        if self.vanished_in is None and round_number >= self.at_round and is_selected(selection, self.device):
            self.fed.kill(self.device)
            self.vanished_in = round_number
            self.say(f"  {self.device} lost power in round {round_number}, right after being selected")
        elif self.vanished_in is not None and not self.returned and round_number >= self.back_at:
            self.restart()
            self.returned = True
            self.say(f"  {self.device} is back online (its agent restarted) in round {round_number}")
