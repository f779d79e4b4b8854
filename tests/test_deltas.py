"""The fused int8 path: checks and folds from an update's codes equal the dense ones, without expanding them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedlite.aggregator.deltas import CodedDelta, as_delta
from fedlite.aggregator.kpis import Sketcher
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import RoundContext, check_update
from fedlite.protocol.codec import Header, decode, encode_update, update_limits
from fedlite.protocol.codecs import UPLINK

SPECS = [("dense/kernel", (300, 64)), ("dense/bias", (64,)), ("out/kernel", (64, 10)), ("out/bias", (10,))]
MANIFEST = {"weights": [{"name": n, "shape": list(s)} for n, s in SPECS]}


def _payload(encoding: str, seed: int = 0, scale: float = 0.05, client: str = "dev-1") -> bytes:
    rng = np.random.default_rng(seed)
    delta = {name: rng.normal(0, scale, shape).astype(np.float32) for name, shape in SPECS}
    header = Header(kind="update", federation="f", round=1, model_hash="ab" * 32, client_id=client, num_examples=7)
    return encode_update(delta, header, encoding=encoding)


def _both(encoding: str, **kw) -> tuple[CodedDelta, dict[str, np.ndarray]]:
    payload = _payload(encoding, **kw)
    coded = as_delta(decode(payload, shapes=SPECS, codes=True).tensors)
    dense = decode(payload, shapes=SPECS).tensors
    return coded, dense


@pytest.mark.parametrize("encoding", UPLINK)
def test_codes_give_the_dense_norm_magnitude_and_sum(encoding: str) -> None:
    coded, dense = _both(encoding)
    assert isinstance(coded, CodedDelta)
    flat = np.concatenate([v.ravel().astype(np.float64) for v in dense.values()])
    assert coded.norm() == pytest.approx(float(np.linalg.norm(flat)), rel=1e-6)
    assert coded.max_abs() == pytest.approx(float(np.abs(flat).max()), rel=1e-6)
    for dtype in ("float32", "float64"):
        fused, plain = make_aggregator("mean", SPECS, sum_dtype=dtype), make_aggregator("mean", SPECS, sum_dtype=dtype)
        fused.add(coded, 7.0)
        plain.add(dense, 7.0)
        fused_mean, plain_mean = fused.result(), plain.result()
        assert all(np.array_equal(fused_mean[k], plain_mean[k]) for k in plain_mean), dtype  # same roundings


def test_clipping_a_coded_update_scales_it_without_touching_the_codes() -> None:
    coded, dense = _both("int8")
    codes_before = {k: c.codes.copy() for k, c in coded.parts.items()}
    clipped = coded.scaled(0.5 / coded.norm())
    assert clipped.norm() == pytest.approx(0.5, rel=1e-9)
    assert all(np.array_equal(c.codes, codes_before[k]) for k, c in clipped.parts.items())
    expanded = clipped.dense()
    assert float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in expanded.values()))) == \
        pytest.approx(0.5, rel=1e-5)


def test_the_sketch_of_codes_equals_the_sketch_of_values() -> None:
    coded, dense = _both("int8")
    sketcher = Sketcher(sum(int(np.prod(s)) for _, s in SPECS), samples=512)
    np.testing.assert_allclose(sketcher.sketch(coded), sketcher.sketch(dense), rtol=1e-6)
    assert sketcher.sketch(coded).shape == (512,)


def test_an_update_is_checked_and_folded_in_less_memory_than_its_float32_values() -> None:
    specs = [("big/kernel", (8000, 512)), ("big/bias", (512,))]
    manifest = {"weights": [{"name": n, "shape": list(s)} for n, s in specs]}
    rng = np.random.default_rng(1)
    delta = {name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in specs}
    header = Header(kind="update", federation="f", round=1, model_hash="ab" * 32, client_id="dev-1", num_examples=5)
    payload = encode_update(delta, header)
    del delta
    ctx = RoundContext("f", 1, "ab" * 32, manifest, frozenset({"dev-1"}), max_update_norm=1.0)
    aggregator = make_aggregator("mean", specs)  # float32 sums: allocated before the measurement
    float32_bytes = 4 * sum(int(np.prod(s)) for _, s in specs)
    tracemalloc.start()
    try:
        update = check_update(payload, "dev-1", ctx, update_limits([s for _, s in specs]))
        aggregator.add(update.values, update.num_examples)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert update.clipped  # the norm bound bit, and clipping cost nothing
    assert peak < 0.5 * float32_bytes, f"peak {peak} B while checking and folding a {float32_bytes} B update"
