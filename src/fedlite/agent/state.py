"""Where the device's state comes from: psutil on a real device, a JSON file for simulated devices."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

from fedlite.fsutil import write_atomic


@dataclass
class DeviceState:
    """One reading of everything the eligibility gates look at."""

    cpu_percent: float = 0.0  # other processes' CPU use, averaged over the idle window, 0-100
    load_per_cpu: float = 0.0  # 1-minute load average divided by the CPU count
    battery_percent: float | None = None  # None: no battery, the device runs on mains
    plugged_in: bool = True
    interfaces_up: list[str] = field(default_factory=list)
    temperature_c: float | None = None  # hottest sensor; None where the device has none
    available_memory_mb: float = 1e9
    online: bool = True  # False: the device drops off the network (simulation of a vanishing device)
    # simulated hardware (0 and 1 on real devices): each training batch takes at least `batch_seconds`, times
    # `slowdown` (a straggler)
    batch_seconds: float = 0.0
    slowdown: float = 1.0


class StateProvider(Protocol):
    def read(self) -> DeviceState: ...


class PsutilState:
    """Real readings from psutil; CPU use excludes this process and its children (a round's process trains for it),
    so training does not veto itself."""

    def __init__(self, window_seconds: float = 30.0, min_interval: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        self._window = window_seconds
        self._min_interval = min_interval
        self._samples: deque[tuple[float, float]] = deque()
        self._cached: DeviceState | None = None
        self._cached_at = 0.0
        psutil.cpu_percent(None)  # the first call only primes the counters
        self._own = (time.monotonic(), self._own_cpu_seconds())

    def read(self) -> DeviceState:
        now = time.monotonic()
        if self._cached is not None and now - self._cached_at < self._min_interval:
            return self._cached
        self._cached, self._cached_at = self._measure(now), now
        return self._cached

    def _measure(self, now: float) -> DeviceState:
        ps = self._psutil
        others = max(0.0, ps.cpu_percent(None) - self._own_percent(now))
        self._samples.append((now, others))
        while self._samples and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        battery = ps.sensors_battery()
        return DeviceState(
            cpu_percent=sum(v for _, v in self._samples) / len(self._samples),
            load_per_cpu=os.getloadavg()[0] / self._cpus,
            battery_percent=None if battery is None else float(battery.percent),
            plugged_in=True if battery is None else bool(battery.power_plugged),
            interfaces_up=sorted(name for name, st in ps.net_if_stats().items() if st.isup),
            temperature_c=_hottest(ps),
            available_memory_mb=ps.virtual_memory().available / 2**20,
        )


    def _own_percent(self, now: float) -> float:
        """This process's and its children's share of all CPUs since the last reading, 0-100."""
        (then, before), seconds = self._own, self._own_cpu_seconds()
        self._own = (now, seconds)
        return max(0.0, seconds - before) / max(now - then, 1e-3) / self._cpus * 100

    def _own_cpu_seconds(self) -> float:
        """CPU seconds of this process, of its children that have exited, and of those still running."""
        times = self._me.cpu_times()
        seconds = times.user + times.system + times.children_user + times.children_system
        for child in self._me.children():
            try:
                child_times = child.cpu_times()
            except self._psutil.Error:
                continue
            seconds += child_times.user + child_times.system
        return seconds


def _hottest(psutil_module) -> float | None:  # noqa: ANN001
    read = getattr(psutil_module, "sensors_temperatures", None)
    readings = [t.current for group in (read() if read else {}).values() for t in group if t.current]
    return max(readings) if readings else None


class FileState:
    """A simulated device: the state is a JSON object in a file, re-read whenever the file changes.

    Keys are DeviceState's fields; missing keys keep their defaults (an idle device on mains with
    eth0 up). Used by the demo and tests so simulated devices go through the real gate code.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._state = DeviceState(interfaces_up=["eth0"])

    def read(self) -> DeviceState:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self._state
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._state, self._stamp = self._load(), stamp
        return self._state

    def _load(self) -> DeviceState:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return self._state  # a half-written file: keep the last good reading
        known = {f.name for f in fields(DeviceState)}
        values = {k: v for k, v in raw.items() if k in known}
        return DeviceState(**({"interfaces_up": ["eth0"]} | values))


def write_state(path: str | Path, **values: object) -> None:
    """Atomically write a simulated device state file."""
    write_atomic(path, json.dumps(values).encode())
