"""Eligibility gates on real and simulated device state."""

from __future__ import annotations

import os
import time

from fedlite.agent.gates import GateThresholds, failed_gates
from fedlite.agent.state import DeviceState, FileState, PsutilState, write_state


def test_an_idle_device_on_mains_and_ethernet_is_eligible():
    assert failed_gates(DeviceState(interfaces_up=["lo", "eth0"]), GateThresholds()) == {}


def test_each_gate_closes_with_a_readable_reason():
    t = GateThresholds()
    cases = {
        "idle": DeviceState(cpu_percent=85, interfaces_up=["eth0"]),
        "charged": DeviceState(battery_percent=95, plugged_in=False, interfaces_up=["eth0"]),
        "on_network": DeviceState(interfaces_up=["lo", "wwan0"]),
        "cool": DeviceState(temperature_c=82, interfaces_up=["eth0"]),
        "memory": DeviceState(available_memory_mb=40, interfaces_up=["eth0"]),
    }
    for gate, state in cases.items():
        failures = failed_gates(state, t)
        assert list(failures) == [gate], (gate, failures)
    assert "metered" in failed_gates(cases["on_network"], t)["on_network"]
    assert "85%" in failed_gates(cases["idle"], t)["idle"]


def test_low_battery_fails_even_when_plugged_in_and_no_battery_means_mains():
    t = GateThresholds(min_battery_percent=50)
    assert "battery 20%" in failed_gates(DeviceState(battery_percent=20, interfaces_up=["eth0"]), t)["charged"]
    assert "charged" not in failed_gates(DeviceState(battery_percent=None, plugged_in=False,
                                                     interfaces_up=["eth0"]), t)


def test_file_state_is_reread_when_the_file_changes(tmp_path):
    path = tmp_path / "state.json"
    provider = FileState(path)
    assert failed_gates(provider.read(), GateThresholds()) == {}
    write_state(path, plugged_in=False, battery_percent=30)
    assert "charged" in failed_gates(provider.read(), GateThresholds())
    time.sleep(0.01)
    write_state(path, online=False)
    assert "on_network" in failed_gates(provider.read(), GateThresholds())


def test_psutil_state_reads_this_machine():
    state = PsutilState(window_seconds=5, min_interval=0).read()
    assert 0 <= state.cpu_percent <= 100
    assert "lo" in state.interfaces_up
    assert state.available_memory_mb > 0
    assert state.load_per_cpu == os.getloadavg()[0] / (os.cpu_count() or 1)
    # loopback alone is no allowed network for training
    assert "on_network" in failed_gates(DeviceState(interfaces_up=["lo"]), GateThresholds())
