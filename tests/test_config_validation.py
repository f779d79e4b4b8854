"""Configuration validation: every numeric key of both configs has a range that the loader enforces,
non-finite numbers are refused everywhere, and the services stop with one line that names the key and an
exit code their systemd units do not restart on."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedlite.agent.config import AgentConfig, DeviceSection
from fedlite.agent.config import load_config as load_agent_config
from fedlite.agent.data import DataSpec
from fedlite.aggregator.config import AggregatorConfig, FederationSection
from fedlite.aggregator.config import load_config as load_aggregator_config
from fedlite.settings import ConfigError, Range, dump_toml, numeric_keys

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"

AGGREGATOR = {"federation": {"name": "digits", "state_dir": "STATE"}}
AGENT = {
    "device": {"client_id": "dev-1", "federation": "digits", "state_dir": "STATE"},
    "data": {"source": "npz", "path": "DATA"},
    "trust": {"allow_unsigned": True},
}
CONFIGS = {
    "aggregator": (AGGREGATOR, load_aggregator_config, AggregatorConfig),
    "agent": (AGENT, load_agent_config, AgentConfig),
}


def write(tmp_path: Path, role: str, changes: dict[str, Any]) -> Path:
    """`role`.toml: the minimal valid config with dotted `changes` ("server.learning_rate": inf) applied."""
    tables = copy.deepcopy(CONFIGS[role][0])
    for table in tables.values():
        for key, value in table.items():
            if value in ("STATE", "DATA"):
                table[key] = str(tmp_path / value.lower())
    for dotted, value in changes.items():
        *path, key = dotted.split(".")  # "server.fedadam.beta1": a key of a sub-table
        table = tables
        for name in path:
            table = table.setdefault(name, {})
        table[key] = value
    path = tmp_path / f"{role}.toml"
    path.write_text(dump_toml(tables))
    return path


def refusal(tmp_path: Path, role: str, changes: dict[str, Any]) -> str:
    path = write(tmp_path, role, changes)
    with pytest.raises(ConfigError) as info:
        CONFIGS[role][1](path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


def loads(tmp_path: Path, role: str, changes: dict[str, Any]) -> Any:
    return CONFIGS[role][1](write(tmp_path, role, changes))


# --- the review's findings, one each ---------------------------------------------------------------------


def test_server_max_abs_value_zero_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path, "aggregator", {"server.max_abs_value": 0}) == "server.max_abs_value must be > 0, not 0"


def test_server_max_update_norm_negative_or_nan_is_refused_and_zero_means_no_bound(tmp_path: Path) -> None:
    assert (refusal(tmp_path, "aggregator", {"server.max_update_norm": -1})
            == "server.max_update_norm must be > 0 (or 0 for no bound), not -1")
    assert (refusal(tmp_path, "aggregator", {"server.max_update_norm": math.nan})
            == "server.max_update_norm must be > 0 and finite (or 0 for no bound), not nan")
    assert loads(tmp_path, "aggregator", {"server.max_update_norm": 0}).server.max_update_norm == 0.0


def test_rounds_seed_negative_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path, "aggregator", {"rounds.seed": -1}) == "rounds.seed must be >= 0, not -1"


def test_privacy_seed_keeps_minus_one_for_unseeded_noise(tmp_path: Path) -> None:
    assert loads(tmp_path, "aggregator", {"privacy.seed": -1}).privacy.seed == -1
    assert (refusal(tmp_path, "aggregator", {"privacy.seed": -2})
            == "privacy.seed must be >= 0 (or -1 for unseeded noise), not -2")


def test_metrics_prometheus_port_above_65535_is_refused_and_zero_means_off(tmp_path: Path) -> None:
    assert (refusal(tmp_path, "aggregator", {"metrics.prometheus_port": 70000})
            == "metrics.prometheus_port must be 1-65535 (or 0 for no endpoint), not 70000")
    assert loads(tmp_path, "aggregator", {"metrics.prometheus_port": 0}).metrics.prometheus_port == 0
    assert loads(tmp_path, "aggregator", {"metrics.prometheus_port": 9100}).metrics.prometheus_port == 9100


def test_rounds_status_ttl_seconds_negative_is_refused(tmp_path: Path) -> None:
    assert (refusal(tmp_path, "aggregator", {"rounds.status_ttl_seconds": -1})
            == "rounds.status_ttl_seconds must be > 0, not -1")


def test_server_learning_rate_inf_is_refused(tmp_path: Path) -> None:
    assert (refusal(tmp_path, "aggregator", {"server.learning_rate": math.inf})
            == "server.learning_rate must be > 0 and finite, not inf")


def test_section_checks_across_keys_name_the_key(tmp_path: Path) -> None:
    assert (refusal(tmp_path, "aggregator", {"rounds.clients_per_round": 4, "rounds.quorum": 5})
            == "rounds.quorum must be <= clients_per_round (4), not 5")
    assert refusal(tmp_path, "aggregator", {"kpis.anomaly_repeat": 6}).startswith(
        "kpis.anomaly_repeat must be <= anomaly_window (5), not 6")
    assert (refusal(tmp_path, "agent", {"broker.reconnect_min_seconds": 90})
            == "broker.reconnect_min_seconds must be <= reconnect_max_seconds (60), not 90")
    assert (refusal(tmp_path, "aggregator", {"model.input_shape": [8, 0]})
            == "model.input_shape[1] must be >= 1, not 0")


# --- every key ---------------------------------------------------------------------------------------------


def default_config(role: str) -> Any:
    if role == "aggregator":
        return AggregatorConfig(FederationSection("digits"))
    return AgentConfig(DeviceSection("dev-1", "digits"), DataSpec())


SET_BY_SECTION = {"server_lr"}  # a field of the [server.<optimizer>] tables that [server] learning_rate sets


def numbers_in_defaults(role: str) -> dict[str, tuple[type, list[float]]]:
    """The int and float keys of a config and their default values, found from the values themselves
    (independently of the type hints the loader reads), sub-tables' ([server.fedadam]) included."""
    config = default_config(role)
    found: dict[str, tuple[type, list[float]]] = {}

    def walk(prefix: str, value: Any, skip: set[str]) -> None:
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name in skip:
                continue
            if isinstance(item, dict) and item and all(dataclasses.is_dataclass(v) for v in item.values()):
                for name, table in item.items():
                    walk(f"{prefix}.{name}", table, SET_BY_SECTION)
            elif isinstance(item, list) and item and all(type(v) in (int, float) for v in item):
                found[f"{prefix}.{f.name}[]"] = (type(item[0]), item)
            elif type(item) in (int, float):
                found[f"{prefix}.{f.name}"] = (type(item), [item])

    for section in dataclasses.fields(config):
        walk(section.name, getattr(config, section.name), set())
    return found


@pytest.mark.parametrize("role", CONFIGS)
def test_every_numeric_key_declares_a_range_that_holds_its_default(role: str) -> None:
    declared, defaults = numeric_keys(CONFIGS[role][2]), numbers_in_defaults(role)
    assert {key: kind for key, (kind, _) in declared.items()} == {key: kind for key, (kind, _) in defaults.items()}
    for key, (_, bound) in declared.items():
        assert bound is not None, f"{role} config: {key} declares no range"
        assert all(bound.allows(v) for v in defaults[key][1]), f"{role} config: {key} default {defaults[key][1]}"


FLOAT_KEYS = [(role, key) for role in CONFIGS for key, (t, _) in numbers_in_defaults(role).items() if t is float]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("role", "key"), FLOAT_KEYS, ids=[f"{r}:{k}" for r, k in FLOAT_KEYS])
def test_every_float_key_refuses_non_finite_values(tmp_path: Path, role: str, key: str, value: float) -> None:
    message = refusal(tmp_path, role, {key: value})
    assert message.startswith(f"{key} must be ") and "finite" in message, message
    assert message.endswith(f", not {value!r}"), message


def outside(bound: Range, integer: bool) -> list[float]:
    """Values just beyond each bound of `bound` (the bound itself where it is excluded)."""
    below = (lambda v: v - 1) if integer else (lambda v: math.nextafter(v, -math.inf))
    above = (lambda v: v + 1) if integer else (lambda v: math.nextafter(v, math.inf))
    values = []
    if bound.ge is not None:
        values.append(below(bound.ge))
    if bound.gt is not None:
        values += [bound.gt, below(bound.gt)]
    if bound.le is not None:
        values.append(above(bound.le))
    if bound.lt is not None:
        values += [bound.lt, above(bound.lt)]
    return [v for v in values if v != bound.special]


BOUNDED = [(role, key, t, bound) for role in CONFIGS for key, (t, bound) in numeric_keys(CONFIGS[role][2]).items()
           if bound is not None]


@pytest.mark.parametrize(("role", "key", "kind", "bound"), BOUNDED, ids=[f"{r}:{k}" for r, k, _, _ in BOUNDED])
def test_every_declared_bound_is_enforced_on_load(tmp_path: Path, role: str, key: str, kind: type,
                                                  bound: Range) -> None:
    for value in outside(bound, kind is int):
        value = int(value) if kind is int else value
        if key.endswith("[]"):
            message = refusal(tmp_path, role, {key.removesuffix("[]"): [value]})
            named = key.replace("[]", "[0]")
        else:
            message = refusal(tmp_path, role, {key: value})
            named = key
        assert message == f"{named} must be {bound.describe(integer=kind is int)}, not {value!r}", message


def test_ints_keep_their_type_checks_and_bools_are_not_numbers(tmp_path: Path) -> None:
    assert refusal(tmp_path, "aggregator", {"rounds.total": 2.5}) == "rounds.total must be int, not 2.5"
    assert refusal(tmp_path, "aggregator", {"server.learning_rate": True}) == (
        "server.learning_rate must be float, not True")
    assert re.match(r"unknown key\(s\) server\.lr; known in \[server\]: ",
                    refusal(tmp_path, "aggregator", {"server.lr": 1.0}))


# --- the services ------------------------------------------------------------------------------------------


def restart_prevented(unit: str) -> set[int]:
    codes: set[int] = set()
    for line in (SYSTEMD_DIR / unit).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "RestartPreventExitStatus":
            codes |= {int(code) for code in value.split()}
    return codes


def run_fedlite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlite.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("role", "key", "value", "expected"), [
    ("aggregator", "server.learning_rate", math.inf, "server.learning_rate must be > 0 and finite, not inf"),
    ("aggregator", "server.optimizer", "sgd",
     "server.optimizer must be one of fedadam, fedavg, fedavgm, fedyogi, not 'sgd'"),
    ("agent", "gates.max_cpu_percent", math.nan, "gates.max_cpu_percent must be in [0, 100] and finite, not nan"),
    ("agent", "broker.port", 70000, "broker.port must be 1-65535, not 70000"),
])
def test_service_with_a_bad_config_prints_one_line_and_exits_without_restart(
        tmp_path: Path, role: str, key: str, value: Any, expected: str) -> None:
    path = write(tmp_path, role, {key: value})
    result = run_fedlite(role, "--config", str(path))
    assert result.stderr.splitlines() == [f"fedlite {role}: {path}: {expected}"], result.stderr
    assert result.returncode != 0 and result.returncode in restart_prevented(f"fedlite-{role}.service")
    assert not (tmp_path / "state").exists()


def test_agent_whose_data_is_missing_exits_with_a_code_systemd_retries(tmp_path: Path) -> None:
    result = run_fedlite("agent", "--config", str(write(tmp_path, "agent", {})))
    assert result.stderr.splitlines() == [f"fedlite agent: data file {tmp_path / 'data'} does not exist"]
    assert result.returncode != 0 and result.returncode not in restart_prevented("fedlite-agent.service")


def test_training_learning_rate_decay_sets_each_rounds_plan_and_is_bounded(tmp_path: Path) -> None:
    from fedlite.protocol.messages import TrainingPlan, to_json

    config = loads(tmp_path, "aggregator", {"training.learning_rate": 0.1, "training.learning_rate_decay": 0.5})
    plans = [config.training.plan(number) for number in (1, 2, 4)]
    assert [p.learning_rate for p in plans] == pytest.approx([0.1, 0.05, 0.0125])
    assert type(plans[0]) is TrainingPlan  # what is broadcast: the plan's fields, nothing server-side
    assert "learning_rate_decay" not in to_json(plans[0]).decode()
    message = refusal(tmp_path, "aggregator", {"training.learning_rate_decay": 1.5})
    assert message.startswith("training.learning_rate_decay must be") and message.endswith("not 1.5"), message


def test_secure_aggregation_refuses_what_needs_single_updates_in_one_line(tmp_path: Path) -> None:
    on = {"secure_aggregation.enabled": True}
    assert "trimmed mean and median rank individual updates" in refusal(
        tmp_path, "aggregator", {**on, "server.aggregation": "median"})
    assert "rounds.mode = 'fedbuff'" in refusal(tmp_path, "aggregator", {**on, "rounds.mode": "fedbuff"})
    assert "kpis.exclude_flagged" in refusal(tmp_path, "aggregator", {**on, "kpis.exclude_flagged": True})
    assert "needs 35-bit sums (at most 32): lower the levels" in refusal(
        tmp_path, "aggregator", {**on, "rounds.clients_per_round": 1000, "secure_aggregation.levels": 2 ** 24})
    assert refusal(tmp_path, "aggregator", {**on, "secure_aggregation.threshold": 0.5}).startswith(
        "secure_aggregation.threshold must be in (0.5, 1]")
    assert loads(tmp_path, "aggregator", {**on, "privacy.enabled": True}).secure_aggregation.enabled
