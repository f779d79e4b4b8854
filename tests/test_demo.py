"""The main job end to end: `fedlite demo` as a user runs it, and `fedlite simulate`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedlite.aggregator.config import DEFAULT_ENCODING


def _children_named(fragment: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if fragment in " ".join(p.info["cmdline"] or [])]


def test_demo_matches_centralized_accuracy_within_three_points_and_secure_aggregation_within_one(tmp_path):
    """The default demo, and beside it (same seed, at the same time) `fedlite demo --secagg`."""
    run_dir, secure_dir = tmp_path / "demo", tmp_path / "secagg"
    started = time.time()
    demos = [subprocess.Popen([sys.executable, "-m", "fedlite.cli", "demo", "--run-dir", str(folder), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for folder, flags in ((run_dir, []), (secure_dir, ["--secagg"]))]
    outputs = [demo.communicate(timeout=900) for demo in demos]
    seconds = time.time() - started
    for demo, (out, err) in zip(demos, outputs, strict=True):
        assert demo.returncode == 0, out[-3000:] + err[-3000:]
    assert seconds < 400, f"the two demos side by side took {seconds:.0f} s"
    result = subprocess.CompletedProcess([], 0, *outputs[0])
    _check_secure_demo(run_dir, secure_dir, outputs[1][0])
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    history = json.loads((run_dir / "aggregator" / "history.json").read_text())
    complete = [r for r in history if r["status"] == "complete"]
    assert summary["rounds"] == len(complete) == 40
    assert summary["clients_per_round"] == 6  # 60 % of 10: what the run used, not the plan's 0
    assert summary["centralized_accuracy"] >= 0.90
    assert summary["final_accuracy"] >= summary["centralized_accuracy"] - 0.03, summary
    assert summary["final_accuracy"] == complete[-1]["accuracy"]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in history) > 0
    assert summary["bytes_down"] == sum(r["bytes_down"] for r in history) > 0
    assert summary["codec"] == DEFAULT_ENCODING
    # weights go down as deltas once devices hold a recent round: under 0.3 x float32 per device and round
    float32_weights = 4 * summary["params"]
    steady = [r["bytes_down"] / r["downloads"] for r in complete[3:] if r["downloads"]]
    assert float(np.mean(steady)) < 0.3 * float32_weights, steady
    updates = sum(r["accepted"] for r in history)
    assert summary["bytes_up_per_update"] == pytest.approx(summary["bytes_up"] / updates, abs=0.05)
    # the KPI block agrees with the per-round history
    kpis, last = summary["kpis"], complete[-1]
    assert kpis["successful_client_rounds"] == sum(r["accepted"] for r in complete)
    assert kpis["selected"] == sum(r["selected"] for r in history)
    assert kpis["declined"] == sum(r["declined"] for r in history) == sum(kpis["declined_by_gate"].values())
    assert kpis["timed_out"] == sum(r["timed_out"] for r in history) == summary["timed_out"]
    assert kpis["cut_off"] == sum(r["cut_off"] for r in history) == summary["cut_off"]
    assert f"{summary['timed_out']} timed out (deadline passed), {summary['cut_off']} cut off" in result.stdout
    assert kpis["epsilon"] is None  # DP is off in the default demo
    # personalization: on the label-skewed split, the devices' fine-tuned heads beat the global model on their own
    # held-out data (the run's last A/B, each device's latest report)
    ab = kpis["personalization"]
    assert ab["devices"] >= 5 and ab["mean_gain"] > 0 and ab["win_share"] > 0, ab
    assert f"mean gain {100 * ab['mean_gain']:+.1f} pt" in result.stdout
    client_accuracies = [m["eval_accuracy_before"] for m in last["client_metrics"].values()]
    assert kpis["client_accuracy_mean"] == pytest.approx(float(np.mean(client_accuracies)))
    assert kpis["client_accuracy_p10"] == pytest.approx(float(np.percentile(client_accuracies, 10)))
    spent = sum(r["bytes_up"] + r["bytes_down"] for r in complete)
    gained = (last["accuracy"] - last["kpis"]["initial_accuracy"]) * 100
    assert kpis["bytes_per_accuracy_point"] == pytest.approx(spent / gained)
    # the simulated fleet did what it claims: gates declined, one device vanished mid-round and came back
    assert sum(r["declined"] for r in history) >= 1
    assert "lost power in round" in result.stdout and "is back online" in result.stdout
    for name in ("accuracy_loss.png", "bytes.png", "participation.png", "bytes_accuracy.png", "accuracy_time.png"):
        png = (run_dir / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (run_dir / "aggregator" / "models" / "round-00040" / "infer_int8.tflite").stat().st_size > 0
    assert not _children_named(str(run_dir)), "processes of the demo are still running"


def _last_rounds_accuracy(run_dir: Path, rounds: int = 5) -> float:
    """The mean accuracy of the last `rounds` complete rounds: one round's accuracy moves by 2 points near the end
    of a run with devices dropping out, the mean of five by a fraction of one."""
    complete = [r for r in json.loads((run_dir / "aggregator" / "history.json").read_text())
                if r["status"] == "complete"]
    return float(np.mean([r["accuracy"] for r in complete[-rounds:]]))


def _check_secure_demo(plain_dir: Path, secure_dir: Path, stdout: str) -> None:
    """The secure demo: within 1 point of the plain one's accuracy over the last five rounds, every round a secure
    one that kept nothing per device, its stages' costs reported."""
    summary = json.loads((secure_dir / "report" / "summary.json").read_text())
    plain = json.loads((plain_dir / "report" / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and plain["secure_aggregation"] is False
    secure, clear = _last_rounds_accuracy(secure_dir), _last_rounds_accuracy(plain_dir)
    assert secure >= clear - 0.01, (secure, clear, summary["final_accuracy"], plain["final_accuracy"])
    complete = [r for r in json.loads((secure_dir / "aggregator" / "history.json").read_text())
                if r["status"] == "complete"]
    assert len(complete) == 40 and all(r["secure_aggregation"]["survivors"] >= 3 for r in complete)
    assert not any(r["client_metrics"] or r["update_norms"] for r in complete)
    assert summary["secure_device_bytes_up_per_round"] > summary["params"]  # a masked input: >= 8 bits a parameter
    assert summary["secure_device_relay_bytes_per_round"] > 0 and summary["secure_device_cpu_seconds_per_round"] > 0
    assert "secure aggregation: per device and round" in stdout


def test_demo_with_a_ternary_codec_on_two_aggregators_sends_a_fraction_of_int8s_bytes(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "demo", "--run-dir", str(run_dir), "--rounds", "3",
                             "--clients", "4", "--codec", "ternary-ef", "--aggregators", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    manifest = json.loads((run_dir / "aggregator" / "models" / "round-00000" / "manifest.json").read_text())
    params = manifest["num_params"]
    assert summary["codec"] == "ternary-ef" and summary["rounds"] == 3
    # int8 codes alone are 1 byte per parameter; ternary codes are 2 bits (plus the frame and its scales)
    assert 0 < summary["bytes_up_per_update"] < 0.5 * params, (summary["bytes_up_per_update"], params)
    assert "ternary-ef" in result.stdout
    history = json.loads((run_dir / "aggregator" / "history.json").read_text())
    assert summary["aggregators"] == 2 and set(summary["updates_by_aggregator"]) <= {"a1", "a2"}
    assert sum(summary["updates_by_aggregator"].values()) == sum(r["accepted"] for r in history
                                                                 if r["status"] == "complete")


def test_demo_in_fedbuff_mode_with_a_straggler_makes_versions_of_buffered_updates(tmp_path):
    run_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "demo", "--run-dir", str(run_dir), "--rounds", "8",
                             "--clients", "6", "--mode", "fedbuff", "--stragglers", "1", "--batch-seconds", "0.02"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    records = json.loads((run_dir / "aggregator" / "history.json").read_text())
    history = [r for r in records if r["status"] == "complete"]
    assert summary["mode"] == "fedbuff" and summary["stragglers"] == 1 and summary["rounds"] == len(history) == 8
    assert all(1 <= r["accepted"] <= 2 for r in history)  # a version is half the 4 devices of a round
    assert sum(r["cut_off"] for r in history) > 0  # still training when a version took its buffer: not late
    accuracy = [r["accuracy"] for r in history]
    assert np.mean(accuracy[-3:]) > accuracy[0] + 0.05, accuracy  # versions of 2 non-IID updates swing: a mean
    assert (run_dir / "report" / "accuracy_time.png").stat().st_size > 1000


def test_demo_refuses_an_unknown_codec_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "demo", "--run-dir", str(tmp_path / "d"),
                             "--codec", "gzip"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == ""
    assert result.stdout.strip().splitlines() == [
        "fedlite demo: unknown codec 'gzip'; choose from int8, int8-tensor, int4, ternary-ef"]
    assert not (tmp_path / "d").exists()


def test_demo_stops_every_process_on_ctrl_c(tmp_path):
    run_dir = tmp_path / "demo"
    # SIGINT as a terminal delivers it: a suite started in the background inherits it ignored, so restore it
    demo = subprocess.Popen([sys.executable, "-m", "fedlite.cli", "demo", "--run-dir", str(run_dir),
                             "--rounds", "200"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "aggregator" / "history.json").exists():
        time.sleep(0.5)
    assert len(_children_named(str(run_dir))) >= 11  # broker, aggregator and ten agents
    demo.send_signal(2)  # SIGINT, as Ctrl-C
    output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 130, output[-2000:]
    assert "every process it started has been stopped" in output
    time.sleep(0.5)
    assert not _children_named(str(run_dir))


def test_simulate_runs_rounds_with_many_virtual_agents_on_two_aggregators(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "simulate", "--clients", "200", "--rounds", "2",
                             "--aggregators", "2", "--run-dir", str(tmp_path / "sim"), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["clients_per_round"] == 200
    assert all(s > 0 for s in summary["round_seconds"]) and summary["updates_per_second"] > 0
    history = json.loads((tmp_path / "sim" / "aggregator" / "history.json").read_text())
    assert all(r["accepted"] >= 180 for r in history if r["status"] == "complete")
    assert [summary["timed_out"], summary["cut_off"]] == [sum(r[k] for r in history) for k in ("timed_out", "cut_off")]
    assert f"{summary['timed_out']} timed out (deadline passed), {summary['cut_off']} cut off" in result.stdout
    shares = summary["aggregators"]  # the broker deals the shared updates to both, each merged exactly once
    assert shares["a1"]["updates"] > 0 and shares["a2"]["updates"] > 0
    assert shares["a1"]["updates"] + shares["a2"]["updates"] == sum(r["accepted"] for r in history
                                                                    if r["status"] == "complete")
    assert all(a["cpu_seconds"] > 0 for a in shares.values())


def test_demo_flags_reach_the_devices_the_aggregator_and_the_baseline_and_a_wanted_fleet_never_waits(tmp_path):
    run_dir = tmp_path / "flags"
    result = subprocess.run([sys.executable, "-m", "fedlite.cli", "demo", "--rounds", "3", "--clients", "3",
                             "--devices", "steady", "--hidden", "16", "--lr", "0.05", "--batch-size", "16",
                             "--lr-decay", "1", "--clients-per-round", "3", "--over-selection", "0.5",
                             "--holdout", "0.1", "--local-epochs", "1", "--run-dir", str(run_dir)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    aggregator = tomllib.loads((run_dir / "aggregator.toml").read_text())
    assert aggregator["training"]["learning_rate"] == 0.05 and aggregator["training"]["batch_size"] == 16
    assert aggregator["rounds"]["clients_per_round"] == 3 and aggregator["rounds"]["over_selection"] == 0.5
    agent = tomllib.loads((run_dir / "agents" / "device-00" / "agent.toml").read_text())
    assert agent["data"]["holdout_fraction"] == 0.1
    manifest = json.loads((run_dir / "aggregator" / "models" / "round-00000" / "manifest.json").read_text())
    assert manifest["options"]["hidden"] == [16] and manifest["num_params"] == 64 * 16 + 16 + 16 * 10 + 10
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["plan"]["hidden"] == [16] and summary["plan"]["devices"] == "steady"
    assert summary["clients_per_round"] == 3  # what the run used
    history = json.loads((run_dir / "aggregator" / "history.json").read_text())
    assert [r["status"] for r in history] == ["complete"] * 3 and sum(r["declined"] for r in history) == 0
    # K = 3 of 3 with over-selection 0.5 wants 5: with nobody else online, no round waits 10 s for them
    gaps = [b["started_at"] - (a["started_at"] + a["duration_seconds"])
            for a, b in zip(history, history[1:], strict=False)]
    assert max(gaps) < 5, gaps


def test_demo_training_flags_that_cannot_run_are_one_line_errors():
    for flags, message in ((["--hidden", "16,x"], "--hidden takes positive sizes"),
                           (["--holdout", "1.5"], "0 < --holdout < 1"),
                           (["--clients-per-round", "50"], "--clients-per-round <= --clients")):
        result = subprocess.run([sys.executable, "-m", "fedlite.cli", "demo", *flags], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and message in result.stdout, result.stdout + result.stderr
        assert len(result.stdout.strip().splitlines()) == 1 and "Traceback" not in result.stderr
