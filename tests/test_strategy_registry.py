"""The strategy registries: names resolved by lookup, each strategy's [server.<name>] table read into its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pytest

from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.strategies import fedavg, make_aggregator, make_server_optimizer, registry
from fedlite.aggregator.strategies.registry import OptimizerSpec, ReducerSpec
from fedlite.settings import ConfigError, Range, from_dict, numeric_keys

BASE = {"federation": {"name": "digits"}}
W0 = {"w": np.array([1.0, -2.0], np.float32)}
D1 = {"w": np.array([0.5, 0.0], np.float32)}
D2 = {"w": np.array([-0.25, 1.0], np.float32)}


def load(server: dict[str, Any]) -> AggregatorConfig:
    return from_dict(AggregatorConfig, BASE | {"server": server})


def refusal(server: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load(server)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config: ")
    return message.removeprefix("config: ")


def test_unknown_names_and_tables_are_one_line_errors_listing_the_registered_ones():
    assert (refusal({"optimizer": "sgd"})
            == "server.optimizer must be one of fedadam, fedavg, fedavgm, fedyogi, not 'sgd'")
    assert (refusal({"aggregation": "mode"})
            == "server.aggregation must be one of mean, median, trimmed_mean, not 'mode'")
    assert (refusal({"fedprox": {"mu": 0.01}})
            == "[server.fedprox]: unknown strategy 'fedprox'; known: fedadam, fedavg, fedavgm, fedyogi, mean, median, "
               "trimmed_mean")
    assert refusal({"beta1": 0.9}).startswith(
        "unknown key(s) server.beta1 (a key of [server.fedadam], [server.fedyogi]); known in [server]: aggregation, ")
    assert (refusal({"fedadam": {"server_lr": 0.1}})
            == "server.fedadam.server_lr is not a key of [server.fedadam]: server.learning_rate sets it")
    assert (refusal({"fedavgm": {"beta1": 0.9}})
            == "unknown key(s) server.fedavgm.beta1; known in [server.fedavgm]: momentum")
    with pytest.raises(ValueError, match=r"^unknown server optimizer 'sgd'; known: fedadam, fedavg, fedavgm, fedyogi$"):
        make_server_optimizer("sgd")
    with pytest.raises(ValueError, match=r"^unknown aggregation 'mode'; known: mean, median, trimmed_mean$"):
        make_aggregator("mode", [("w", (2,))])


def test_built_in_tables_reach_the_optimizer_and_the_aggregator():
    server = load({"optimizer": "fedavgm", "learning_rate": 0.5, "fedavgm": {"momentum": 0.5},
                   "aggregation": "trimmed_mean", "trimmed_mean": {"trim_fraction": 0.25}}).server
    # as the service builds them
    opt = make_server_optimizer(server.optimizer, config=server.strategies[server.optimizer])
    agg = make_aggregator(server.aggregation, [("w", (2,))], config=server.strategies[server.aggregation])
    state = opt.init(W0)
    w1, state = opt.step(W0, D1, state)
    w2, state = opt.step(w1, D2, state)
    # v1 = d1 = [0.5, 0], v2 = 0.5 * v1 + d2 = [0, 1]; w2 = w0 + 0.5 * (v1 + v2)
    np.testing.assert_allclose(state.velocity["w"], [0.0, 1.0])
    np.testing.assert_allclose(w2["w"], [1.25, -1.5])
    for value in ([1, 10], [2, 20], [3, 30], [100, -100]):
        agg.add({"w": np.array(value, np.float32)}, 1)
    np.testing.assert_allclose(agg.result()["w"], [2.5, 15.0])  # floor(0.25 * 4) = 1 dropped from each side
    assert server.strategies["mean"].sum_dtype == "float32" and server.strategies["fedadam"].server_lr == 0.5
    assert registry.reducer("mean").streaming and not registry.reducer("median").streaming


@dataclass(frozen=True)
class SignConfig:
    server_lr: float = 1.0
    scale: Annotated[float, Range(gt=0)] = 1.0


def _sign_step(weights: dict, delta: dict, state: int, config: SignConfig) -> tuple[dict, int]:
    step = np.float32(config.server_lr * config.scale)
    return {name: w + step * np.sign(delta[name]) for name, w in weights.items()}, state + 1


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_OPTIMIZERS", dict(registry._OPTIMIZERS))
    monkeypatch.setattr(registry, "_REDUCERS", dict(registry._REDUCERS))


def test_a_newly_registered_strategy_gets_its_table_bounds_and_name(isolated_registry: None):
    registry.register_optimizer(OptimizerSpec(
        "signsgd", SignConfig, lambda weights, config: 0, _sign_step, lambda state: {"step": np.array(state)},
        lambda arrays: int(arrays["step"]), citation="Bernstein et al., signSGD, ICML 2018"))
    server = load({"optimizer": "signsgd", "learning_rate": 0.5, "signsgd": {"scale": 4}}).server
    assert server.strategies["signsgd"] == SignConfig(server_lr=0.5, scale=4.0)
    opt = make_server_optimizer(server.optimizer, config=server.strategies[server.optimizer])
    w1, _ = opt.step(W0, D2, opt.init(W0))
    np.testing.assert_allclose(w1["w"], [1.0 - 2.0, -2.0 + 2.0])  # w + 0.5 * 4 * sign(d)
    assert refusal({"signsgd": {"scale": 0}}) == "server.signsgd.scale must be > 0, not 0"
    assert "server.signsgd.scale" in numeric_keys(AggregatorConfig)
    assert refusal({"optimizer": "sgd"}).startswith("server.optimizer must be one of fedadam, fedavg, fedavgm, "
                                                    "fedyogi, signsgd, not")
    with pytest.raises(ValueError, match="'fedadam' is already registered"):  # one namespace: [server.<name>]
        registry.register_reducer(ReducerSpec("fedadam", fedavg.MeanConfig, lambda specs, config: None,
                                              streaming=True, citation=""))
