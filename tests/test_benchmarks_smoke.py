"""Smoke run of benchmarks/run.py at tiny sizes, so the benchmarks keep working as the code under them changes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_FLOWER = importlib.util.find_spec("flwr") is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--json",
                           str(out / "results.json"), "--out", str(out / "RESULTS.md")],
                          capture_output=True, text=True, timeout=280, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| measure | fedlite | Flower |" in (out / "RESULTS.md").read_text()
    return json.loads((out / "results.json").read_text())


@pytest.mark.timeout(300)
def test_fedlite_columns_have_real_numbers(smoke: dict) -> None:
    results = smoke["results"]
    for row in results["uplink"]:
        assert 0 < row["fedlite_bytes"] <= 0.27 * row["float32_bytes"]
    for row in results["aggregation"]:
        assert row["fedlite_seconds"] > 0 and row["fedlite_peak_bytes"] >= 0
        assert all(r["checksum"] == r["checksum"] for r in row["fedlite_runs"])  # not NaN
    agent = results["footprint"]["fedlite"]
    assert 10 * 2**20 < agent["idle_bytes"] <= agent["train_peak_bytes"] < 2**30
    assert agent["update_examples"] == 480
    for row in results["training_speed"]:
        assert row["tflite_samples_per_s"] > 0 and row["tf_samples_per_s"] > 0
    conv = results["convergence"]
    assert 0 < conv["int8_final"] <= 1 and 0 < conv["float32_final"] <= 1
    assert len(conv["curves"]["int8"]) == conv["rounds"] + 1


@pytest.mark.timeout(300)
def test_flower_columns_when_flower_is_installed(smoke: dict) -> None:
    if not HAVE_FLOWER:
        pytest.skip("flwr is not installed here (it lives in .venv-bench only): Flower columns not measured")
    results = smoke["results"]
    assert all(row["flower_bytes"] > row["fedlite_bytes"] for row in results["uplink"])
    assert all(row["flower_seconds"] > 0 and "memory_ratio" in row for row in results["aggregation"])
    assert results["footprint"]["flower_tflite"]["idle_bytes"] > 0
    assert results["convergence"]["flower_final"] > 0


@pytest.mark.timeout(300)
def test_codec_study_measures_every_variant_and_the_coarser_codecs_send_less(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec_study.py"), "--tasks", "health",
                           "--rounds", "4", "--seeds", "2", "--no-timing", "--cache", str(tmp_path)],
                          capture_output=True, text=True, timeout=280, cwd=ROOT / "benchmarks", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["uplink"], r["downlink"]): r for r in json.loads(proc.stdout)["tasks"][0]["rows"]}
    up = [rows[(codec, "full")]["bytes_up_per_update"] for codec in ("float32", "int8", "int4", "ternary-ef")]
    assert up == sorted(up, reverse=True)  # each codec coarser than the last sends less
    full = rows[("int8", "full")]
    for delta in ("int8", "int4", "ternary-ef"):  # devices that hold last round's weights get a delta
        assert rows[("int8", delta)]["bytes_down_steady"] < 0.7 * full["bytes_down_steady"]
        assert rows[("int8", delta)]["downloads"]["delta"] > 0
    assert full["downloads"]["delta"] == 0 and full["accuracy"]["mean"] > 0.7  # four rounds of training
