"""Aggregation strategies: the streaming mean, merging partial sums, server optimizers, robust statistics."""

from __future__ import annotations

import numpy as np
import pytest

from fedlite.aggregator.strategies import (
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    make_aggregator,
    make_server_optimizer,
    registry,
)
from fedlite.aggregator.strategies.robust import clip_by_global_norm, global_norm

SPECS = [("dense/kernel", (6, 4)), ("dense/bias", (4,)), ("scalar", ())]


def _deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in SPECS} for _ in range(n)]


def _weights(n: int, seed: int = 1) -> list[int]:
    return [int(w) for w in np.random.default_rng(seed).integers(1, 500, n)]


# --- streaming FedAvg ---------------------------------------------------------------------------


def test_streaming_mean_equals_numpy_weighted_average():
    deltas, weights = _deltas(9), _weights(9)
    state = fedavg.init(SPECS)
    for delta, weight in zip(deltas, weights, strict=True):
        state = fedavg.accumulate(state, delta, weight)
    result = fedavg.mean(state)
    assert state.count == 9 and state.total_weight == sum(weights)
    for name, _ in SPECS:
        expected = np.average(np.stack([d[name] for d in deltas]).astype(np.float64), axis=0, weights=weights)
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-9)


def test_accumulate_does_not_keep_or_modify_the_delta():
    delta = _deltas(1)[0]
    before = {k: v.copy() for k, v in delta.items()}
    state = fedavg.accumulate(fedavg.init(SPECS), delta, 3)
    delta["dense/bias"][:] = 99.0  # a later change to the caller's arrays must not leak into the sum
    for name, value in before.items():
        if name != "dense/bias":
            assert np.array_equal(delta[name], value)
    np.testing.assert_allclose(state.sums["dense/bias"], 3.0 * before["dense/bias"].astype(np.float64))


def test_merge_of_partials_equals_one_accumulation():
    deltas, weights = _deltas(10, seed=2), _weights(10, seed=3)
    single = fedavg.init(SPECS)
    for d, w in zip(deltas, weights, strict=True):
        fedavg.accumulate(single, d, w)
    part_a, part_b = fedavg.init(SPECS), fedavg.init(SPECS)
    for d, w in zip(deltas[:4], weights[:4], strict=True):
        fedavg.accumulate(part_a, d, w)
    for d, w in zip(deltas[4:], weights[4:], strict=True):
        fedavg.accumulate(part_b, d, w)
    merged = fedavg.merge(part_a, part_b)
    assert merged.count == single.count and merged.total_weight == single.total_weight
    for name, _ in SPECS:
        # sequential ((a1+a2)+...)+b1... vs (a1+...)+(b1+...): float64 re-association only
        np.testing.assert_allclose(merged.sums[name], single.sums[name], rtol=0, atol=1e-12)
        np.testing.assert_allclose(fedavg.mean(merged)[name], fedavg.mean(single)[name], rtol=1e-7, atol=0)
    # merge is commutative bitwise and the empty sum is its identity
    flipped = fedavg.merge(part_b, part_a)
    same = fedavg.merge(fedavg.init(SPECS), single)
    for name, _ in SPECS:
        assert np.array_equal(merged.sums[name], flipped.sums[name])
        assert np.array_equal(same.sums[name], single.sums[name])


def test_merge_is_bitwise_exact_for_int8_updates_with_power_of_two_scales():
    rng = np.random.default_rng(4)
    deltas = [{name: (rng.integers(-127, 128, shape) * 2.0**-10).astype(np.float32) for name, shape in SPECS}
              for _ in range(12)]
    weights = _weights(12, seed=5)
    single, parts = fedavg.init(SPECS), [fedavg.init(SPECS) for _ in range(3)]
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        fedavg.accumulate(single, d, w)
        fedavg.accumulate(parts[i % 3], d, w)
    merged = fedavg.merge(fedavg.merge(parts[0], parts[1]), parts[2])
    for name, _ in SPECS:
        assert np.array_equal(merged.sums[name], single.sums[name])


def test_running_sum_round_trips_through_arrays_and_survives_safetensors():
    from safetensors.numpy import load, save

    state = fedavg.init(SPECS)
    for d, w in zip(_deltas(3), [1.5, 2, 7], strict=True):
        fedavg.accumulate(state, d, w)
    back = fedavg.from_arrays(load(save(fedavg.to_arrays(state))))
    assert back.count == 3 and back.total_weight == 10.5
    for name, _ in SPECS:
        assert np.array_equal(back.sums[name], state.sums[name]) and back.sums[name].dtype == np.float64
    fedavg.accumulate(back, _deltas(1)[0], 1)  # a restored partial keeps accumulating


def test_mean_of_nothing_and_bad_inputs_are_clear_errors():
    state = fedavg.init(SPECS)
    with pytest.raises(ValueError, match="zero updates"):
        fedavg.mean(state)
    with pytest.raises(ValueError, match="missing"):
        fedavg.accumulate(state, {"dense/kernel": np.zeros((6, 4), np.float32)}, 1)
    bad = _deltas(1)[0] | {"dense/bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        fedavg.accumulate(state, bad, 1)
    with pytest.raises(ValueError, match="weight"):
        fedavg.accumulate(state, _deltas(1)[0], 0)
    assert state.count == 0


def test_large_tensor_is_accumulated_in_chunks_exactly():
    specs = [("big", (3, 70_000))]
    rng = np.random.default_rng(6)
    delta = {"big": rng.normal(size=(3, 70_000)).astype(np.float32)}
    state = fedavg.accumulate(fedavg.init(specs), delta, 3)
    assert np.array_equal(state.sums["big"], delta["big"].astype(np.float64) * 3.0)


# --- server optimizers --------------------------------------------------------------------------


W0 = {"w": np.array([1.0, -2.0], np.float32)}
D1 = {"w": np.array([0.5, 0.0], np.float32)}
D2 = {"w": np.array([-0.25, 1.0], np.float32)}


def test_fedavg_server_step():
    state = fedavg.init_server(W0)
    w1, state = fedavg.server_step(W0, D1, state, fedavg.FedAvgConfig(server_lr=0.5))
    w2, state = fedavg.server_step(w1, D2, state, fedavg.FedAvgConfig(server_lr=0.5))
    np.testing.assert_allclose(w2["w"], [1.125, -1.5])
    assert state.step == 2 and np.array_equal(W0["w"], [1.0, -2.0])  # inputs untouched


def test_fedavgm_matches_hand_computed_two_steps():
    config = fedavgm.FedAvgMConfig(server_lr=0.5, momentum=0.9)
    state = fedavgm.init_server(W0)
    w1, state = fedavgm.server_step(W0, D1, state, config)
    # v1 = [0.5, 0], w1 = w0 + 0.5 * v1
    np.testing.assert_allclose(state.velocity["w"], [0.5, 0.0])
    np.testing.assert_allclose(w1["w"], [1.25, -2.0])
    w2, state = fedavgm.server_step(w1, D2, state, config)
    # v2 = 0.9 * v1 + d2 = [0.2, 1.0], w2 = w1 + 0.5 * v2
    np.testing.assert_allclose(state.velocity["w"], [0.2, 1.0], rtol=1e-6)
    np.testing.assert_allclose(w2["w"], [1.35, -1.5], rtol=1e-6)
    assert state.step == 2


def test_fedadam_matches_hand_computed_two_steps():
    config = fedadam.FedAdamConfig(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    state = fedadam.init_server(W0, config)
    np.testing.assert_allclose(state.v["w"], [0.01, 0.01])  # v starts at tau^2
    w1, state = fedadam.server_step(W0, D1, state, config)
    # m1 = 0.1 * d1 = [0.05, 0]; v1 = 0.99 * 0.01 + 0.01 * d1^2 = [0.0124, 0.0099]
    # w1 = w0 + 0.1 * m1 / (sqrt(v1) + 0.1)
    np.testing.assert_allclose(state.m["w"], [0.05, 0.0], rtol=1e-6)
    np.testing.assert_allclose(state.v["w"], [0.0124, 0.0099], rtol=1e-6)
    np.testing.assert_allclose(w1["w"], [1.023656848451251, -2.0], rtol=1e-6)
    w2, state = fedadam.server_step(w1, D2, state, config)
    # m2 = 0.9 * m1 + 0.1 * d2 = [0.02, 0.1]; v2 = 0.99 * v1 + 0.01 * d2^2 = [0.012901, 0.019801]
    np.testing.assert_allclose(state.m["w"], [0.02, 0.1], rtol=1e-6)
    np.testing.assert_allclose(state.v["w"], [0.012901, 0.019801], rtol=1e-6)
    np.testing.assert_allclose(w2["w"], [1.0330209084893243, -1.9584572736505346], rtol=1e-6)


def test_fedyogi_matches_hand_computed_two_steps():
    config = fedyogi.FedYogiConfig(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    state = fedyogi.init_server(W0, config)
    np.testing.assert_allclose(state.v["w"], [0.01, 0.01])  # v starts at tau^2
    w1, state = fedyogi.server_step(W0, D1, state, config)
    # m1 = [0.05, 0]; v1 = v0 - 0.01 * d1^2 * sign(v0 - d1^2) = [0.01 + 0.01 * 0.25, 0.01 - 0] = [0.0125, 0.01]
    # (FedAdam's v1 is [0.0124, 0.0099]: Yogi leaves v alone where the delta is 0)
    np.testing.assert_allclose(state.m["w"], [0.05, 0.0], rtol=1e-6)
    np.testing.assert_allclose(state.v["w"], [0.0125, 0.01], rtol=1e-6)
    np.testing.assert_allclose(w1["w"], [1 + 0.1 * 0.05 / (np.sqrt(0.0125) + 0.1), -2.0], rtol=1e-6)
    w2, state = fedyogi.server_step(w1, D2, state, config)
    # m2 = [0.02, 0.1]; d2^2 = [0.0625, 1] > v1, so v2 = v1 + 0.01 * d2^2 = [0.013125, 0.02]
    np.testing.assert_allclose(state.m["w"], [0.02, 0.1], rtol=1e-6)
    np.testing.assert_allclose(state.v["w"], [0.013125, 0.02], rtol=1e-6)
    # w2 = w1 + 0.1 * m2 / (sqrt(v2) + 0.1)
    expected = [1 + 0.005 / (np.sqrt(0.0125) + 0.1) + 0.002 / (np.sqrt(0.013125) + 0.1),
                -2.0 + 0.01 / (np.sqrt(0.02) + 0.1)]
    np.testing.assert_allclose(w2["w"], expected, rtol=1e-6)
    assert state.step == 2 and np.array_equal(W0["w"], [1.0, -2.0])  # inputs untouched


@pytest.mark.parametrize("name", registry.optimizer_names())
def test_optimizer_state_round_trips_and_resumes_identically(name):
    from safetensors.numpy import load, save

    opt = make_server_optimizer(name)
    state = opt.init(W0)
    w1, state = opt.step(W0, D1, state)
    restored = opt.state_from_arrays(load(save(opt.state_to_arrays(state))))
    w2a, _ = opt.step(w1, D2, state)
    w2b, after = opt.step(w1, D2, restored)
    assert np.array_equal(w2a["w"], w2b["w"]) and after.step == 2


def test_learning_rate_is_an_alias_for_server_lr():
    assert make_server_optimizer("fedadam", learning_rate=0.3).config.server_lr == 0.3
    with pytest.raises(ValueError, match="not both"):
        make_server_optimizer("fedavg", learning_rate=0.3, server_lr=0.3)


def test_factories_refuse_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="fedadam"):
        make_server_optimizer("sgd")
    with pytest.raises(ValueError, match="server_lr"):
        make_server_optimizer("fedavgm", lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        make_server_optimizer("fedavgm", momentum=1.5)
    with pytest.raises(ValueError, match="median"):
        make_aggregator("mode", SPECS)
    with pytest.raises(ValueError, match="delta names"):
        fedavg.server_step(W0, {"v": np.zeros(2, np.float32)}, fedavg.init_server(W0))


# --- robust aggregation -------------------------------------------------------------------------


def _with_outlier(n: int) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    honest = _deltas(n, seed=7)
    outlier = {name: np.full(shape, 50.0, np.float32) for name, shape in SPECS}
    return honest, outlier


@pytest.mark.parametrize("kind", ["trimmed_mean", "median"])
def test_robust_aggregators_ignore_an_extreme_outlier_that_shifts_the_mean(kind):
    honest, outlier = _with_outlier(9)
    params = {"trim_fraction": 0.1} if kind == "trimmed_mean" else {}
    robust, plain = make_aggregator(kind, SPECS, **params), make_aggregator("mean", SPECS)
    for agg in (robust, plain):
        for d in [*honest, outlier]:
            agg.add(d, 10)
        assert agg.count == 10
    r, p = robust.result(), plain.result()
    for name, _ in SPECS:
        honest_stack = np.stack([d[name] for d in honest])
        assert np.all(p[name] > 4.0)  # the mean is dragged to ~5
        assert np.all(r[name] <= honest_stack.max(axis=0) + 1e-7)
        assert np.all(r[name] >= honest_stack.min(axis=0) - 1e-7)
        assert r[name].dtype == np.float32 and r[name].shape == np.shape(honest[0][name])


def test_trimmed_mean_and_median_values():
    specs = [("x", (2,))]
    values = [[1, 10], [2, 20], [3, 30], [4, 40], [100, -100]]
    trimmed, median = make_aggregator("trimmed_mean", specs, trim_fraction=0.2), make_aggregator("median", specs)
    for v in values:
        trimmed.add({"x": np.array(v, np.float32)}, 1)
        median.add({"x": np.array(v, np.float32)}, 1000)  # weights are ignored by design
    # trim 1 from each side: x0 -> mean(2, 3, 4); x1 -> mean(10, 20, 30)
    np.testing.assert_allclose(trimmed.result()["x"], [3.0, 20.0])
    np.testing.assert_allclose(median.result()["x"], [3.0, 20.0])
    with pytest.raises(ValueError, match="trim_fraction"):
        make_aggregator("trimmed_mean", specs, trim_fraction=0.5)
    with pytest.raises(ValueError, match="zero updates"):
        make_aggregator("median", specs).result()


def test_clipping_yields_the_bound_and_leaves_small_updates_alone():
    delta = _deltas(1, seed=8)[0]
    norm = global_norm(delta)
    clipped, original = clip_by_global_norm(delta, norm / 4)
    assert original == pytest.approx(norm)
    assert global_norm(clipped) == pytest.approx(norm / 4, rel=1e-6)
    assert global_norm(delta) == pytest.approx(norm)  # not in place by default
    same, original = clip_by_global_norm(delta, norm * 2)
    assert all(same[k] is delta[k] for k in delta) and original == pytest.approx(norm)
    inplace, _ = clip_by_global_norm(delta, 1e-3, inplace=True)
    assert inplace["dense/kernel"] is delta["dense/kernel"]
    assert global_norm(delta) == pytest.approx(1e-3, rel=1e-6)


def test_float32_accumulators_are_close_and_keep_their_dtype():
    deltas, weights = _deltas(20, seed=9), _weights(20, seed=10)
    wide, narrow = fedavg.init(SPECS), fedavg.init(SPECS, dtype="float32")
    for d, w in zip(deltas, weights, strict=True):
        fedavg.accumulate(wide, d, w)
        fedavg.accumulate(narrow, d, w)
    assert narrow.sums["dense/kernel"].dtype == np.float32
    assert fedavg.from_arrays(fedavg.to_arrays(narrow)).sums["dense/kernel"].dtype == np.float32
    for name, _ in SPECS:
        np.testing.assert_allclose(fedavg.mean(narrow)[name], fedavg.mean(wide)[name], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="float64 or float32"):
        fedavg.init(SPECS, dtype="float16")
