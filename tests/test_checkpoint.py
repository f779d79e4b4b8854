"""Round checkpoints: round trip, pruning by validity, fallback past corrupt ones, failed writes, resume, reset."""

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
    ResumeRefused,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)
from fedlite.aggregator.state_dir import load_for_resume, reset_state
from fedlite.fsutil import StorageError, write_atomic


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



def _corrupt(path) -> None:
    blob = bytearray((path / ARRAYS_FILE).read_bytes())
    blob[-5] ^= 0xFF
    (path / ARRAYS_FILE).write_bytes(bytes(blob))


def test_pruning_never_deletes_the_checkpoint_just_written_when_the_newer_ones_are_corrupt(tmp_path, caplog):
    """Every checkpoint of rounds 4-6 corrupt, the federation started again: its round 1 checkpoint stays."""
    for path in [save_checkpoint(tmp_path, _ckpt(r), keep=3) for r in (4, 5, 6)]:
        _corrupt(path)
    with caplog.at_level(logging.WARNING, logger="fedlite.aggregator.checkpoint"):
        save_checkpoint(tmp_path, _ckpt(1), keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1]
    _assert_same(load_latest(tmp_path), _ckpt(1))
    quarantined = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir() if p.name.startswith("corrupt-"))
    assert quarantined == ["corrupt-round-000004", "corrupt-round-000005", "corrupt-round-000006"]  # not deleted
    assert "checkpoint of round 6 fails to verify" in caplog.text


def test_pruning_keeps_the_newest_valid_checkpoints_past_a_corrupt_one(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, _ckpt(r), keep=3)
    _corrupt(tmp_path / "round-000003")
    save_checkpoint(tmp_path, _ckpt(4), keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [1, 2, 4]  # 3 quarantined: 1 is still one of the 3 valid
    save_checkpoint(tmp_path, _ckpt(5), keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [2, 4, 5]


def _history(folder, rounds) -> None:
    write_atomic(folder / "history.json", json.dumps([{"round": r, "status": "complete"} for r in rounds]).encode())


def test_resume_of_a_fresh_state_is_round_zero_and_of_a_valid_one_its_newest_checkpoint(tmp_path):
    assert load_for_resume(tmp_path / "checkpoints", tmp_path / "history.json") is None
    (tmp_path / "history.json").write_text("[]")
    assert load_for_resume(tmp_path / "checkpoints", tmp_path / "history.json") is None
    save_checkpoint(tmp_path / "checkpoints", _ckpt(1))
    _corrupt(save_checkpoint(tmp_path / "checkpoints", _ckpt(2)))
    _history(tmp_path, [1, 2])
    _assert_same(load_for_resume(tmp_path / "checkpoints", tmp_path / "history.json"), _ckpt(1))


def test_resume_refuses_a_state_whose_checkpoints_all_fail_to_verify(tmp_path):
    for path in [save_checkpoint(tmp_path / "checkpoints", _ckpt(r)) for r in (4, 5, 6)]:
        _corrupt(path)
    with pytest.raises(ResumeRefused) as info:
        load_for_resume(tmp_path / "checkpoints", tmp_path / "history.json")
    message = str(info.value)
    assert "rounds 4, 5, 6 fail to verify" in message and "--reset" in message and "\n" not in message
    assert isinstance(info.value, StorageError)  # the CLI's exit code 3
    assert [r for r, _ in list_checkpoints(tmp_path / "checkpoints")] == [4, 5, 6]  # nothing removed


@pytest.mark.parametrize("history", ["completed", "garbage"])
def test_resume_refuses_a_history_without_any_checkpoint(tmp_path, history):
    if history == "completed":
        _history(tmp_path, [1, 2, 3])
    else:
        (tmp_path / "history.json").write_text("[{truncated")
    with pytest.raises(ResumeRefused, match="no valid checkpoint in .*history.json records "
                       + ("3 completed rounds" if history == "completed" else "a history that does not parse")):
        load_for_resume(tmp_path / "checkpoints", tmp_path / "history.json")


def test_reset_moves_the_progress_aside_and_keeps_the_initial_model(tmp_path):
    save_checkpoint(tmp_path / "checkpoints", _ckpt(3))
    _history(tmp_path, [1, 2, 3])
    for name in ("registry.json", "fleet.json", "registry.json.lock", "keep-me.toml"):
        (tmp_path / name).write_text("{}")
    for r in (0, 2, 3):
        (tmp_path / "models" / f"round-{r:05d}").mkdir(parents=True)
    aside, moved = reset_state(tmp_path)
    assert aside.parent == tmp_path and aside.name.startswith("previous-")
    assert moved == ["checkpoints", "history.json", "registry.json", "fleet.json", "models/round-00002",
                     "models/round-00003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["models", "registry.json.lock", "keep-me.toml",
                                                                 aside.name])
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["round-00000"]
    assert load_latest(aside / "checkpoints").round == 3 and (aside / "models" / "round-00003").is_dir()
    assert load_for_resume(tmp_path / "checkpoints", tmp_path / "history.json") is None  # a fresh start
    assert reset_state(tmp_path) is None  # nothing left to move
