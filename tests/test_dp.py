"""DP-FedAvg: clipping, the noise's scale, RDP accounting, the [privacy] section, and a private run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from helpers_models import digits_split

from fedlite.aggregator.config import AggregatorConfig, PrivacySection
from fedlite.aggregator.strategies import dp
from fedlite.aggregator.strategies.robust import global_norm
from fedlite.demo.cluster import LocalFederation, wait_for, write_shard
from fedlite.settings import ConfigError, from_dict

SPECS = [("dense/kernel", (64, 32)), ("dense/bias", (32,)), ("out/kernel", (32, 10))]


def _delta(scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, scale, shape).astype(np.float32) for name, shape in SPECS}


def _zero() -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name, shape in SPECS}


# --- the mechanism ------------------------------------------------------------------------------


def test_clipping_bounds_each_update_norm_and_leaves_small_ones_alone():
    for seed, scale in enumerate([1e-4, 0.01, 0.1, 1.0, 30.0]):
        delta = _delta(scale, seed)
        clipped, norm = dp.clip(delta, 0.5)
        assert norm == pytest.approx(global_norm(delta))
        assert global_norm(clipped) <= 0.5 * (1 + 1e-6)
        if norm <= 0.5:
            assert all(clipped[k] is delta[k] for k in delta)
        else:
            assert global_norm(clipped) == pytest.approx(0.5, rel=1e-6)
            assert global_norm(delta) == pytest.approx(norm)  # the input is not modified


def test_without_noise_the_aggregate_is_the_clipped_sum_over_the_fixed_denominator():
    deltas = [_delta(s, i) for i, s in enumerate([0.001, 0.05, 2.0])]
    aggregator = dp.DpMeanAggregator(SPECS, dp.DpParams(clip_norm=1.0, noise_multiplier=0.0, denominator=5.0),
                                     dp.noise_rng(0, 1))
    for delta, examples in zip(deltas, [10, 1000, 3], strict=True):
        aggregator.add(delta, examples)  # example counts are ignored: equal weights
    result = aggregator.result()
    assert aggregator.count == 3
    for name, _ in SPECS:
        expected = sum(dp.clip(d, 1.0)[0][name].astype(np.float64) for d in deltas) / 5.0
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-8)


def test_noise_has_the_configured_standard_deviation():
    params = dp.DpParams(clip_norm=0.7, noise_multiplier=1.3, denominator=4.0)
    specs = [("big", (400, 500))]  # 200k coordinates: the sample std is within ~0.2 % of the truth
    aggregator = dp.DpMeanAggregator(specs, params, dp.noise_rng(seed=7, round_=3))
    aggregator.add({"big": np.zeros((400, 500), np.float32)})
    noise_on_sum = aggregator.result()["big"].astype(np.float64) * params.denominator
    assert params.noise_std == pytest.approx(0.91)
    assert noise_on_sum.std() == pytest.approx(0.91, rel=0.01)
    assert abs(noise_on_sum.mean()) < 4 * 0.91 / math.sqrt(noise_on_sum.size)


def test_seeded_noise_is_reproducible_per_round_and_unseeded_noise_is_not():
    def draw(seed: int, round_: int) -> np.ndarray:
        return dp.add_noise({"x": np.zeros(50)}, 1.0, dp.noise_rng(seed, round_))["x"]

    np.testing.assert_array_equal(draw(3, 1), draw(3, 1))
    assert not np.array_equal(draw(3, 1), draw(3, 2))
    assert not np.array_equal(draw(-1, 1), draw(-1, 1))


# --- accounting ---------------------------------------------------------------------------------


def test_epsilon_falls_with_more_noise_and_grows_with_rounds():
    by_noise = [dp.epsilon(50, 0.01, z, 1e-5) for z in (0.6, 0.8, 1.0, 1.5, 3.0)]
    by_rounds = [dp.epsilon(t, 0.01, 1.0, 1e-5) for t in (1, 10, 100, 1000)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == len(by_noise) and by_noise[-1] > 0
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds) and by_rounds[0] > 0
    assert dp.epsilon(0, 0.01, 1.0, 1e-5) == 0.0


def test_epsilon_matches_dp_accounting_computed_directly():
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 200))
    assert dp.epsilon(200, 0.02, 1.1, 1e-6) == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-9)


def test_history_epsilon_counts_completed_dp_rounds_only_and_resumes_from_history():
    charge = dp.charge_record(dp.RoundCharge(0.1, 1.0, 0.5, fleet_size=60, denominator=6.0))
    other = dp.charge_record(dp.RoundCharge(0.2, 2.0, 0.5, fleet_size=30, denominator=6.0))
    history = [{"status": "complete", "privacy": charge}, {"status": "abandoned"},
               {"status": "complete", "privacy": charge}, {"status": "complete", "epsilon": None},
               {"status": "complete", "privacy": other}]
    expected = dp.epsilon_of_rounds([(0.1, 1.0), (0.1, 1.0), (0.2, 2.0)], 1e-5)
    assert dp.history_epsilon(history, 1e-5) == pytest.approx(expected)
    assert dp.history_epsilon(history[:3], 1e-5) == pytest.approx(dp.epsilon(2, 0.1, 1.0, 1e-5))
    assert dp.sampling_rate(8, 10) == 0.8 and dp.sampling_rate(8, 4) == 1.0


# --- configuration ------------------------------------------------------------------------------


def test_privacy_section_defaults_and_validation():
    section = PrivacySection()
    assert (section.enabled, section.clip_norm, section.noise_multiplier, section.delta, section.fleet_size,
            section.seed) == (False, 1.0, 1.0, 1e-5, 0, -1)
    base = {"federation": {"name": "f"}}
    config = from_dict(AggregatorConfig, base | {"privacy": {"enabled": True, "clip_norm": 2}})
    assert config.privacy.clip_norm == 2.0
    for bad in ({"clip_norm": 0.0}, {"noise_multiplier": -1.0}, {"delta": 1.0}, {"fleet_size": -1}, {"seed": -2}):
        with pytest.raises(ConfigError):
            from_dict(AggregatorConfig, base | {"privacy": bad})
    with pytest.raises(ConfigError, match="aggregation"):
        from_dict(AggregatorConfig, base | {"privacy": {"enabled": True}, "server": {"aggregation": "median"}})


# --- end to end ---------------------------------------------------------------------------------


def test_private_run_records_a_growing_epsilon_and_stops_at_its_budget(tmp_path: Path):
    agents, clip_norm, z = ["dev-1", "dev-2", "dev-3"], 0.5, 0.8
    budget = (dp.epsilon(4, 1.0, z, 1e-5) + dp.epsilon(5, 1.0, z, 1e-5)) / 2  # room for 4 rounds of the 6
    x_train, y_train, x_test, y_test = digits_split()
    with LocalFederation(tmp_path / "run", "digits", agents) as fed:
        fed.start_broker()
        for agent, part in zip(agents, np.array_split(np.argsort(y_train, kind="stable"), 3), strict=True):
            shard = write_shard(tmp_path / f"{agent}.npz", x_train[part], y_train[part])
            fed.start(agent, "agent", fed.agent_config(agent, shard, agent={"status_interval_seconds": 0.5}))
        np.savez(tmp_path / "test.npz", x=x_test, y=y_test)
        config = fed.aggregator_config(
            model={"arch": "mlp", "input_shape": [64], "classes": 10, "export_every": 0},
            rounds={"total": 6, "clients_per_round": 3, "over_selection": 0.0, "deadline_seconds": 30.0,
                    "wait_for_devices_seconds": 20.0},
            training={"epochs": 2, "batch_size": 16, "learning_rate": 0.1},
            evaluation={"test_data": str(tmp_path / "test.npz")},
            privacy={"enabled": True, "clip_norm": clip_norm, "noise_multiplier": z, "delta": 1e-5, "seed": 1,
                     "max_epsilon": budget},
        )
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: aggregator.popen.poll() is not None, 240, "the aggregator to finish",
                 fed.processes.values(), poll=0.5)
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        history = json.loads((fed.run_dir / "aggregator" / "history.json").read_text())
        log = aggregator.log.read_text()
    rounds = [r for r in history if r["status"] == "complete"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    epsilons = [r["epsilon"] for r in rounds]
    assert all(math.isfinite(e) and e > 0 for e in epsilons) and epsilons == sorted(set(epsilons)), epsilons
    for t, record in enumerate(rounds, start=1):
        charge = record["privacy"]
        assert record["delta"] == 1e-5 and charge["fleet_size"] == 3 and charge["sampling_rate"] == 1.0
        assert charge["noise_multiplier"] == z and charge["clip_norm"] == clip_norm
        assert record["epsilon"] == pytest.approx(dp.epsilon(t, 1.0, z, 1e-5))
        assert record["clipped"] == sum(n > clip_norm for n in record["update_norms"].values())
        assert record["accuracy"] is not None
    assert sum(r["clipped"] for r in rounds) > 0  # the bound is active on this task
    assert f"ε {epsilons[-1]:.3g} at δ 1e-05" in log and "Traceback" not in log
    assert epsilons[-1] <= budget < dp.epsilon(5, 1.0, z, 1e-5)  # round 5 would have spent beyond the budget
    assert f"privacy budget reached: epsilon {epsilons[-1]:.3g} spent, round 5 would take it" in log
