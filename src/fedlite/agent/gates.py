"""Device eligibility: train only when idle, charged, on an allowed unmetered network, cool, with memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

from fedlite.agent.state import DeviceState


@dataclass
class GateThresholds:
    max_cpu_percent: float = 30.0
    max_load_per_cpu: float = 0.8
    min_battery_percent: float = 80.0
    require_plugged_in: bool = True
    allowed_interfaces: list[str] = field(default_factory=lambda: ["eth*", "en*", "wlan*", "wl*"])
    metered_interfaces: list[str] = field(default_factory=lambda: ["wwan*", "ppp*", "rmnet*", "usb*"])
    max_temperature_c: float = 70.0
    min_available_memory_mb: float = 150.0


def idle(state: DeviceState, t: GateThresholds) -> str | None:
    if state.cpu_percent > t.max_cpu_percent:
        return f"CPU busy: {state.cpu_percent:.0f}% > {t.max_cpu_percent:.0f}%"
    if state.load_per_cpu > t.max_load_per_cpu:
        return f"load {state.load_per_cpu:.2f} per CPU > {t.max_load_per_cpu:.2f}"
    return None


def charged(state: DeviceState, t: GateThresholds) -> str | None:
    if state.battery_percent is None:
        return None  # no battery: mains powered
    if t.require_plugged_in and not state.plugged_in:
        return f"on battery ({state.battery_percent:.0f}%)"
    if state.battery_percent < t.min_battery_percent:
        return f"battery {state.battery_percent:.0f}% < {t.min_battery_percent:.0f}%"
    return None


def on_network(state: DeviceState, t: GateThresholds) -> str | None:
    if not state.online:
        return "offline"
    usable = [
        name for name in state.interfaces_up
        if any(fnmatch(name, p) for p in t.allowed_interfaces)
        and not any(fnmatch(name, p) for p in t.metered_interfaces)
    ]
    if usable:
        return None
    metered = [n for n in state.interfaces_up if any(fnmatch(n, p) for p in t.metered_interfaces)]
    return f"only metered network ({', '.join(metered)})" if metered else "no allowed network interface up"


def cool(state: DeviceState, t: GateThresholds) -> str | None:
    if state.temperature_c is not None and state.temperature_c > t.max_temperature_c:
        return f"too hot: {state.temperature_c:.0f} C > {t.max_temperature_c:.0f} C"
    return None


def memory(state: DeviceState, t: GateThresholds) -> str | None:
    if state.available_memory_mb < t.min_available_memory_mb:
        return f"memory {state.available_memory_mb:.0f} MB < {t.min_available_memory_mb:.0f} MB"
    return None


GATES = {"idle": idle, "charged": charged, "on_network": on_network, "cool": cool, "memory": memory}


def failed_gates(state: DeviceState, thresholds: GateThresholds) -> dict[str, str]:
    """The gates that are closed, each with a reason a person can read; empty when eligible."""
    failures = {name: gate(state, thresholds) for name, gate in GATES.items()}
    return {name: reason for name, reason in failures.items() if reason}


def describe(failures: dict[str, str]) -> str:
    return "; ".join(f"{name}: {reason}" for name, reason in failures.items())
