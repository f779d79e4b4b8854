"""Round checkpoints: exact round trip, pruning, fallback past a corrupt newest one, failed writes."""

from __future__ import annotations

import json
import logging
import resource

import numpy as np
import pytest

from fedlite.aggregator.checkpoint import (
    ARRAYS_FILE,
    META_FILE,
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)


def _ckpt(round_: int, size: int = 12) -> Checkpoint:
    rng = np.random.default_rng(round_)
    weights = {"dense/kernel": rng.normal(size=(size, 3)).astype(np.float32), "dense/bias": np.zeros(3, np.float32)}
    optimizer = {"m/dense/kernel": rng.normal(size=(size, 3)).astype(np.float32), "step": np.array(round_)}
    history = [{"round": r, "accepted": 3, "loss": 0.5 / (r + 1), "rejected": {"stale": 1}} for r in range(round_ + 1)]
    meta = {"federation": "fed", "model_hash": "ab" * 32, "rng": np.random.default_rng(7).bit_generator.state}
    return Checkpoint(round_, weights, optimizer, history, meta)


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.round == b.round and a.history == b.history and a.meta == b.meta
    assert list(a.weights) == list(b.weights) and list(a.optimizer_state) == list(b.optimizer_state)
    for key in a.weights:
        x, y = a.weights[key], b.weights[key]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    for key in a.optimizer_state:
        x, y = a.optimizer_state[key], b.optimizer_state[key]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_round_trip_is_exact(tmp_path):
    ckpt = _ckpt(12)
    path = save_checkpoint(tmp_path, ckpt)
    assert path.name == "round-000012" and {p.name for p in path.iterdir()} == {ARRAYS_FILE, META_FILE}
    loaded = load_latest(tmp_path)
    _assert_same(loaded, ckpt)
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded.meta["rng"]  # the RNG resumes where it was
    assert rng.random() == np.random.default_rng(7).random()


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    assert load_latest(tmp_path) is None
    assert load_latest(tmp_path / "absent") is None


def test_keep_prunes_older_checkpoints_and_leftover_temporaries(tmp_path):
    (tmp_path / ".tmp-round-000003-deadbeef").mkdir()  # an interrupted earlier save
    for r in range(1, 7):
        save_checkpoint(tmp_path, _ckpt(r), keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004", "round-000005", "round-000006"]
    assert load_latest(tmp_path).round == 6


def test_saving_the_same_round_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, _ckpt(2))
    again = _ckpt(2)
    again.history.append({"note": "resaved"})
    save_checkpoint(tmp_path, again)
    _assert_same(load_latest(tmp_path), again)
    assert [p.name for p in tmp_path.iterdir()] == ["round-000002"]


@pytest.mark.parametrize("damage", ["flip_array_byte", "truncate_arrays", "garbage_json", "missing_json"])
def test_corrupt_newest_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    save_checkpoint(tmp_path, _ckpt(1))
    newest = save_checkpoint(tmp_path, _ckpt(2))
    arrays, meta = newest / ARRAYS_FILE, newest / META_FILE
    if damage == "flip_array_byte":
        blob = bytearray(arrays.read_bytes())
        blob[-5] ^= 0xFF
        arrays.write_bytes(bytes(blob))
    elif damage == "truncate_arrays":
        arrays.write_bytes(arrays.read_bytes()[:40])
    elif damage == "garbage_json":
        meta.write_text("{not json")
    else:
        meta.unlink()
    with caplog.at_level(logging.WARNING, logger="fedlite.aggregator.checkpoint"):
        loaded = load_latest(tmp_path)
    _assert_same(loaded, _ckpt(1))
    assert "skipping checkpoint of round 2" in caplog.text


def test_a_checkpoint_recording_another_round_is_skipped(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    newest = save_checkpoint(tmp_path, _ckpt(2))
    record = json.loads((newest / META_FILE).read_text())
    record["round"] = 9
    (newest / META_FILE).write_text(json.dumps(record))
    assert load_latest(tmp_path).round == 1


def test_write_failure_mid_file_keeps_the_previous_checkpoint(tmp_path):
    """A disk-full-like failure that also hits root: RLIMIT_FSIZE makes the write fail with EFBIG."""
    save_checkpoint(tmp_path, _ckpt(1))
    big = _ckpt(2, size=100_000)  # ~1.2 MB of weights, beyond the limit below
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))  # CPython ignores SIGXFSZ: write() fails
    try:
        with pytest.raises(CheckpointError) as info:
            save_checkpoint(tmp_path, big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert str(tmp_path) in message and "round 2" in message and "too large" in message.lower()
    assert isinstance(info.value.__cause__, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001"]  # no temporary left behind
    _assert_same(load_latest(tmp_path), _ckpt(1))


def test_directory_that_cannot_exist_raises_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the checkpoint directory's parent should be")
    with pytest.raises(CheckpointError, match=r"cannot write the round 3 checkpoint into .*not-a-dir/ckpt"):
        save_checkpoint(blocker / "ckpt", _ckpt(3))
    assert load_latest(blocker / "ckpt") is None


def test_unserializable_meta_is_a_checkpoint_error(tmp_path):
    bad = _ckpt(1)
    bad.meta["when"] = object()
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_directory_that_cannot_hold_files(tmp_path):
    from fedlite.aggregator.checkpoint import check_writable

    check_writable(tmp_path / "ok")  # creates it, leaves nothing behind
    assert list((tmp_path / "ok").iterdir()) == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        check_writable(tmp_path / "a-file" / "checkpoints")

