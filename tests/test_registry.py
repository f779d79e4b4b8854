"""The model registry on its own: versions from export folders, atomic locked writes, clear errors."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from fedlite.aggregator.canary import judge
from fedlite.aggregator.model_cli import add_arguments, run
from fedlite.aggregator.registry import Registry, RegistryError


def _export(models: Path, number: int, blob: bytes, accuracy: float | None = 0.5, metrics: bool = True) -> Path:
    """A folder shaped like the exporter's: int8 model, manifest naming its sha256, metrics written last."""
    folder = models / f"round-{number:05d}"
    folder.mkdir(parents=True)
    (folder / "infer_int8.tflite").write_bytes(blob)
    manifest = {"model_hash": "m" * 64, "files": {"infer_int8": {"sha256": hashlib.sha256(blob).hexdigest()}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if metrics:
        (folder / "metrics.json").write_text(json.dumps({"round": number, "accuracy": accuracy, "loss": 1.25}))
    return folder


def test_sync_registers_finished_exports_as_versions(tmp_path: Path):
    models = tmp_path / "models"
    _export(models, 0, b"initial")  # the untrained round-0 export is not a version
    _export(models, 1, b"one", accuracy=0.75)
    _export(models, 2, b"two", accuracy=None)
    _export(models, 3, b"three", metrics=False)  # export still running
    os.utime(models / "round-00001" / "metrics.json", (1_700_000_000, 1_700_000_000))  # exported long ago
    registry = Registry(tmp_path)
    assert registry.sync() == [1, 2]
    assert registry.version(1)["created_at"] == 1_700_000_000  # the export's time, not the registering list's
    assert registry.sync() == []
    state = json.loads((tmp_path / "registry.json").read_text())
    assert set(state) == {"versions", "deployed", "rollout", "requests"}
    assert state["deployed"] is None and state["rollout"] is None and state["requests"] == []
    one, two = state["versions"]
    assert one == {"version": 1, "round": 1, "sha256": hashlib.sha256(b"one").hexdigest(), "accuracy": 0.75,
                   "loss": 1.25, "created_at": one["created_at"], "path": str((models / "round-00001").resolve())}
    assert two["accuracy"] is None and two["version"] == 2
    (models / "round-00003" / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "loss": 0.3}))
    assert registry.sync() == [3]
    assert [v["version"] for v in registry.read()["versions"]] == [1, 2, 3]


def test_unknown_versions_are_refused_with_the_known_ones(tmp_path: Path):
    _export(tmp_path / "models", 1, b"one")
    registry = Registry(tmp_path)
    registry.sync()
    with pytest.raises(RegistryError, match=r"unknown version 7 \(known versions: 1\)"):
        registry.version(7)
    with pytest.raises(RegistryError, match="unknown version 7"):
        registry.request("promote", 7)
    assert registry.read()["requests"] == []
    with pytest.raises(RegistryError, match="unknown version 4"):
        Registry(tmp_path / "empty").version(4)


def test_cli_names_unknown_versions_and_a_missing_aggregator(tmp_path: Path, capsys):
    import argparse

    _export(tmp_path / "models", 1, b"one")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["show", "9", "--state-dir", str(tmp_path)])) == 2
    assert "unknown version 9 (known versions: 1)" in capsys.readouterr().err
    assert run(parser.parse_args(["list", "--state-dir", str(tmp_path / "typo")])) == 2
    assert "no aggregator state directory at" in capsys.readouterr().err  # not "no versions yet"
    assert run(parser.parse_args(["show", "1", "--state-dir", str(tmp_path)])) == 0
    shown = capsys.readouterr().out.splitlines()
    created = next(line for line in shown if line.startswith("created_at: "))
    assert created[len("created_at: "):][:2] == "20" and "." not in created  # a date, not a unix time
    assert "deployed: no" in shown and "infer_int8.sha256: " + hashlib.sha256(b"one").hexdigest() in shown
    assert not any("{" in line or "True" in line or "None" in line for line in shown), shown
    assert run(parser.parse_args(["promote", "9", "--state-dir", str(tmp_path)])) == 2
    assert run(parser.parse_args(["promote", "1", "--state-dir", str(tmp_path)])) == 1
    assert "no aggregator is serving rollouts" in capsys.readouterr().err
    assert Registry(tmp_path).read()["requests"] == []
    assert run(parser.parse_args(["promote", "1", "--state-dir", str(tmp_path), "--queue", "--wait", "0"])) == 0
    assert [r["state"] for r in Registry(tmp_path).read()["requests"]] == ["pending"]
    assert run(parser.parse_args(["list", "--state-dir", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "deployed: nothing" in out and "pending requests: promote 1" in out


def test_writes_are_atomic_for_concurrent_readers(tmp_path: Path):
    registry = Registry(tmp_path)
    with registry.edit() as state:
        state["versions"] = [{"version": i, "pad": "x" * 2000} for i in range(50)]
    stop, torn = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                json.loads(registry.path.read_text())
            except ValueError as exc:
                torn.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        with registry.edit() as state:
            state["deployed"] = i
    stop.set()
    thread.join()
    assert not torn
    assert registry.read()["deployed"] == 199
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "registry.json.lock"]  # no temp files


def _append_requests(state_dir: str, count: int) -> None:
    registry = Registry(state_dir)
    for _ in range(count):
        registry.request("rollback", None)


def test_locked_edits_from_several_processes_lose_nothing(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_requests, args=(str(tmp_path), 15)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    requests = Registry(tmp_path).read()["requests"]
    assert len(requests) == 60 and len({r["id"] for r in requests}) == 60


def test_previously_deployed_is_the_last_other_version(tmp_path: Path):
    registry = Registry(tmp_path)
    assert registry.previously_deployed(None) is None
    for version, how in ((2, "promote"), (3, "canary-promote"), (3, "rollback")):
        registry.log_deployment(version, how)
    assert registry.previously_deployed(3) == 2
    assert registry.previously_deployed(2) == 3


def test_judge_compares_mean_candidate_with_mean_current_accuracy():
    good = {"a": {"accuracy_candidate": 0.80, "accuracy_current": 0.81},
            "b": {"accuracy_candidate": 0.90, "accuracy_current": 0.90}}
    assert judge(good, 0.02)[0] is True
    bad = {"a": {"accuracy_candidate": 0.10, "accuracy_current": 0.85}}
    promote, reason = judge(bad, 0.02)
    assert promote is False and "0.100 vs current 0.850" in reason
    assert judge({}, 0.02)[0] is False
    assert judge({"a": {"accuracy_candidate": 0.5, "accuracy_current": None}}, 0.02)[0] is True
