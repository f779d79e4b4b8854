"""The demo's run report (summary.json, PNG plots, progress lines) and its centralized baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlite.aggregator.record import records
from fedlite.demo.baseline import centralized_accuracy
from fedlite.demo.datasets import load_task
from fedlite.demo.report import (
    PLOTS,
    _caption,
    _int,
    float32_traffic,
    format_progress,
    human_bytes,
    participation_figure,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history() -> list[dict]:
    """Five rounds; round 3 abandoned (too few clients accepted)."""
    rows = []
    for rnd in range(1, 6):
        complete = rnd != 3
        rows.append({
            "round": rnd, "status": "complete" if complete else "abandoned", "selected": 10,
            "accepted": 7 if complete else 1, "declined": 2 if complete else 8,
            "declined_by_gate": {"idle": 1, "charging": 1} if complete else {"battery": 5, "idle": 3},
            "aborted": 1 if rnd == 4 else 0, "timed_out": 0 if complete else 1, "cut_off": 1 if rnd in (2, 4) else 0,
            "rejected": {"norm": 1} if rnd == 5 else {}, "bytes_up": 7_000 * rnd + 123, "bytes_down": 250_000 + rnd,
            "downloads": 7 if complete else 1,
            "accuracy": 0.5 + 0.1 * rnd if complete else None, "loss": 1.5 - 0.2 * rnd if complete else None,
            "duration_seconds": 1.5 + rnd, "started_at": 1000.0 + 10 * rnd, "completed_at": 1008.0 + 10 * rnd,
        })
    return rows


def test_write_report_totals_match_the_history(tmp_path: Path) -> None:
    history = _history()
    extra = {"task": "digits", "clients": 10, "partition": "dirichlet", "alpha": 0.3, "duration_seconds": 42.0,
             "model_dir": tmp_path / "model"}
    summary = write_report(tmp_path / "report", history, centralized_accuracy=0.95, extra=extra)
    on_disk = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert on_disk == summary
    assert summary["final_accuracy"] == pytest.approx(1.0)
    assert summary["centralized_accuracy"] == 0.95
    assert summary["rounds"] == 4 and summary["rounds_abandoned"] == 1
    for key in ("bytes_up", "bytes_down", "selected", "accepted", "declined", "aborted", "timed_out", "cut_off"):
        assert summary[key] == sum(r[key] for r in history), key
    assert summary["declined_by_gate"] == {"battery": 5, "charging": 4, "idle": 7}
    assert summary["rejected"] == {"norm": 1}
    up, down = sum(r["bytes_up"] for r in history), sum(r["bytes_down"] for r in history)
    assert summary["bytes_up_per_update"] == pytest.approx(up / 29, abs=0.05)  # 4 x 7 + 1 accepted
    assert summary["bytes_down_per_device_round"] == pytest.approx(down / 29, abs=0.05)  # the 29 that reported
    assert summary["task"] == "digits" and summary["alpha"] == 0.3 and summary["duration_seconds"] == 42.0
    assert summary["model_dir"] == str(tmp_path / "model")
    history_on_disk = json.loads((tmp_path / "report" / "history.json").read_text())
    assert [r["round"] for r in history_on_disk] == [1, 2, 3, 4, 5]


def test_plots_are_readable_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    write_report(tmp_path, _history(), centralized_accuracy={"accuracy": 0.95, "loss": 0.2, "seconds": 1.0},
                 extra={"task": "health", "params": 6570, "codec": "int4"})
    for name in PLOTS:
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(path)
        assert image.shape[0] >= 300 and image.shape[1] >= 600, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} looks blank"
    top = participation_figure(records(_history())).axes[0]
    legend = [text.get_text() for text in top.get_legend().get_texts()]
    assert "timed out" in legend and "cut off (not needed)" in legend, legend
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in top.containers}
    assert heights["cut off (not needed)"] == [0, 1, 0, 1, 0] and heights["timed out"] == [0, 0, 1, 0, 0]


def test_the_caption_names_the_run_and_the_float32_traffic_counts_both_directions() -> None:
    caption = _caption({"task": "digits", "clients": 10, "partition": "dirichlet", "alpha": 0.5, "codec": "int4"})
    assert caption == "digits, 10 clients, dirichlet alpha=0.5, int4 updates"
    record = records(_history())[0]  # 7 updates accepted, 7 devices that reported their downloads
    assert float32_traffic(record, 6570) == 4 * 6570 * 14
    assert _int(record, "bytes_up") + _int(record, "bytes_down") < float32_traffic(record, 6570)


def test_report_of_an_empty_or_failed_run(tmp_path: Path) -> None:
    abandoned = [{**_history()[2], "round": 1}]
    summary = write_report(tmp_path, abandoned, centralized_accuracy=None, extra={})
    assert summary["final_accuracy"] is None and summary["rounds"] == 0 and summary["rounds_abandoned"] == 1
    assert write_report(tmp_path / "empty", [], centralized_accuracy=0.9, extra={})["bytes_up"] == 0
    assert all((tmp_path / "empty" / name).stat().st_size > 1000 for name in PLOTS)


def test_format_progress_is_one_informative_line() -> None:
    line = format_progress({"round": 3, "status": "complete", "selected": 13, "accepted": 8, "declined": 3,
                            "declined_by_gate": {"idle": 2, "charged": 1}, "aborted": 0, "timed_out": 2,
                            "cut_off": 1, "rejected": {}, "bytes_up": 41_200, "bytes_down": 310_000, "accuracy": 0.8743,
                            "loss": 0.4, "duration_seconds": 4.07}, total_rounds=20)
    assert line == ("round  3/20  accepted 8/13  declined 3 (idle 2, charged 1)  timed out 2  cut off 1  acc 0.874  "
                    "up 41.2 kB  down 310.0 kB  4.1 s")
    abandoned = format_progress(_history()[2], total_rounds=5)
    assert "\n" not in abandoned and "ABANDONED" in abandoned and " acc " not in abandoned


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 999, 41_200, 3_100_000, 2.5e9)] == ["0 B", "999 B", "41.2 kB", "3.1 MB",
                                                                           "2.5 GB"]


@pytest.mark.parametrize("name", ["digits", "health"])
def test_centralized_baseline_reaches_090(tmp_path: Path, name: str) -> None:
    from fedlite.model_export.convert import export_model
    from fedlite.runtime.trainer import Trainer

    task = load_task(name, seed=0)
    export_model(task.arch, task.input_shape, task.classes, tmp_path, options=task.options,
                 representative=task.x_train, seed=0)
    start = Trainer.from_dir(tmp_path).get_weights()
    result = centralized_accuracy(task, epochs=5, batch_size=task.batch_size, lr=task.lr, seed=0, model_dir=tmp_path)
    print(f"{name}: centralized accuracy {result['accuracy']:.3f} in {result['seconds']:.2f} s")
    assert result["accuracy"] >= 0.90 and np.isfinite(result["loss"]) and not result["aborted"]
    again = centralized_accuracy(task, 5, task.batch_size, task.lr, 0, tmp_path, initial_weights=start)
    assert again["accuracy"] == pytest.approx(result["accuracy"])  # the export's weights are the starting point
