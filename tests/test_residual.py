"""The agent's error-feedback residual store: kept across rounds a device skips, reset when it no longer fits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedlite.agent.residual import ResidualKey, ResidualStore
from fedlite.protocol.codecs.ternary_ef import MAX_RESIDUAL_AGE

RESIDUAL = {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "dense/bias": np.ones(3, np.float32)}


def _key(round_: int, **values: str) -> ResidualKey:
    return ResidualKey(**({"run": "r1", "model_hash": "m1", "encoding": "ternary-ef"} | values), round=round_)


def _saved(tmp_path: Path, round_: int = 5) -> ResidualStore:
    store = ResidualStore(tmp_path / "residual.npz")
    store.stage(_key(round_), RESIDUAL)
    store.commit()
    return store


def test_a_residual_is_kept_while_a_device_skips_rounds_and_survives_a_new_store(tmp_path: Path) -> None:
    _saved(tmp_path)
    for later in (5, 6, 5 + MAX_RESIDUAL_AGE):
        got = ResidualStore(tmp_path / "residual.npz").load(_key(later))  # a new process reads the same file
        assert got is not None and all(np.array_equal(got[k], RESIDUAL[k]) for k in RESIDUAL)


@pytest.mark.parametrize("key, why", [
    (_key(6, run="r2"), "a new run"),
    (_key(6, model_hash="m2"), "a new model"),
    (_key(6, encoding="int4"), "a new encoding"),
    (_key(6 + MAX_RESIDUAL_AGE), f"it is {1 + MAX_RESIDUAL_AGE} rounds old"),
    (_key(4), "the round went back"),
])
def test_a_residual_that_no_longer_fits_is_reset_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              key: ResidualKey, why: str) -> None:
    store = _saved(tmp_path)
    with caplog.at_level(logging.INFO, logger="fedlite.agent"):
        assert store.load(key) is None
    assert f"residual of round 5 reset: {why}" in caplog.text
    assert not store.path.exists() and store.load(_key(5)) is None


def test_only_a_committed_residual_is_written(tmp_path: Path) -> None:
    store = _saved(tmp_path)
    store.stage(_key(6), {k: v * 0 for k, v in RESIDUAL.items()})  # an update that was never delivered
    assert np.array_equal(ResidualStore(store.path).load(_key(6))["dense/bias"], RESIDUAL["dense/bias"])
    store.commit()
    assert not np.any(ResidualStore(store.path).load(_key(6))["dense/bias"])


def test_an_unreadable_residual_file_means_no_residual(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "residual.npz"
    path.write_bytes(b"PK\x03\x04 not a zip")
    with caplog.at_level(logging.WARNING, logger="fedlite.agent"):
        assert ResidualStore(path).load(_key(1)) is None
    assert "unreadable" in caplog.text and not path.exists()


def test_a_failed_write_does_not_stop_the_agent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResidualStore(tmp_path / "missing-dir" / "residual.npz")
    store.stage(_key(1), RESIDUAL)
    with caplog.at_level(logging.WARNING, logger="fedlite.agent"):
        store.commit()
    assert "residual not saved" in caplog.text and store.load(_key(1)) is None
