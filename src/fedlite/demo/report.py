"""Run report: summary.json, history.json and PNG plots of accuracy, traffic, accuracy per byte and participation."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlite.aggregator.record import RoundRecord, records

Record = RoundRecord

SUMMARY_FILE = "summary.json"
HISTORY_FILE = "history.json"
PLOTS = ("accuracy_loss.png", "bytes.png", "participation.png", "bytes_accuracy.png", "accuracy_time.png")
COUNTS = ("selected", "accepted", "declined", "aborted", "timed_out", "cut_off")
# a selected device that had not answered at the close: timed out (the deadline passed), or cut off (the round had
# its K updates first: not needed, not a fault)
LABELS = {"timed_out": "timed out", "cut_off": "cut off (not needed)"}
COLORS = {"selected": "#444444", "accepted": "#2b8a3e", "declined": "#e8590c", "aborted": "#c92a2a",
          "timed_out": "#868e96", "cut_off": "#b2f2bb", "rejected": "#862e9c", "up": "#1c7ed6", "down": "#f59f00",
          "accuracy": "#1c7ed6", "loss": "#e03131", "baseline": "#343a40", "float32": "#adb5bd"}
DPI = 110
MANY_ROUNDS = 40  # beyond this, per-round bars get too thin: draw lines instead


# ---------------------------------------------------------------- numbers


def human_bytes(n: float) -> str:
    """Bytes in decimal units: `512 B`, `41.2 kB`, `3.1 MB`."""
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _unit(max_bytes: float) -> tuple[str, float]:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if max_bytes >= scale:
            return unit, scale
    return "B", 1.0


def _num(value: Any) -> float | None:
    """A finite float, or None for missing / NaN values."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _int(record: Record, key: str) -> int:
    value = getattr(record, key)
    return int(value) if value is not None else 0


def _counter(record: Record, key: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in (getattr(record, key) or {}).items()}




def _add(total: dict[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    for key, count in counts.items():
        total[key] = total.get(key, 0) + count
    return total


def final_accuracy(history: Sequence[Record]) -> tuple[float | None, float | None]:
    """(accuracy, loss) of the last completed round that reports an accuracy."""
    for record in reversed(history):
        if record.complete and _num(record.accuracy) is not None:
            return _num(record.accuracy), _num(record.loss)
    return None, None


def totals(history: Sequence[Record]) -> dict[str, Any]:
    """Sums over the history: rounds, traffic, participation and reasons."""
    accuracies = [a for r in history if r.complete and (a := _num(r.accuracy)) is not None]
    gates: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for record in history:
        _add(gates, _counter(record, "declined_by_gate"))
        _add(reasons, _counter(record, "rejected"))
    out = {
        "rounds": sum(1 for r in history if r.complete),
        "rounds_abandoned": sum(1 for r in history if not r.complete),
        "rounds_total": len(history),
        "bytes_up": sum(_int(r, "bytes_up") for r in history),
        "bytes_down": sum(_int(r, "bytes_down") for r in history),
        "downloads": sum(_int(r, "downloads") for r in history),
        **{key: sum(_int(r, key) for r in history) for key in COUNTS},
        "declined_by_gate": dict(sorted(gates.items())),
        "rejected": dict(sorted(reasons.items())),
        "best_accuracy": max(accuracies) if accuracies else None,
        "round_seconds_total": round(sum(_num(r.duration_seconds) or 0.0 for r in history), 3),
    }
    # every payload received (refused ones too) over the updates accepted; what devices say they received for a
    # round (model, weights, deltas) over the devices that said it
    out["bytes_up_per_update"] = round(out["bytes_up"] / out["accepted"], 1) if out["accepted"] else None
    out["bytes_down_per_device_round"] = (round(out["bytes_down"] / out["downloads"], 1) if out["downloads"]
                                          else None)
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(value), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- live progress


def format_progress(record: Record | Mapping[str, Any], total_rounds: int | None = None) -> str:
    """One terminal line per round, e.g. `round  3/20  accepted 8/13  declined 3 (idle 2, charged 1)  acc 0.874 ...`."""
    record = records([record])[0]
    total = total_rounds or record.extra.get("total_rounds") or record.extra.get("rounds")
    width = len(str(total)) if total else 2
    head = f"round {record.round:>{width}}" + (f"/{total}" if total else "")
    parts = [head]
    if not record.complete:
        parts.append("ABANDONED")
    parts.append(f"accepted {_int(record, 'accepted')}/{_int(record, 'selected')}")
    declined = _int(record, "declined")
    if declined:
        gates = _counter(record, "declined_by_gate")
        detail = ", ".join(f"{g} {c}" for g, c in sorted(gates.items(), key=lambda kv: -kv[1]) if c)
        parts.append(f"declined {declined}" + (f" ({detail})" if detail else ""))
    for key, label in (("aborted", "aborted"), ("timed_out", "timed out"), ("cut_off", "cut off")):
        if _int(record, key):
            parts.append(f"{label} {_int(record, key)}")
    rejected = _counter(record, "rejected")
    if sum(rejected.values()):
        parts.append(f"rejected {sum(rejected.values())} (" + ", ".join(f"{k} {v}" for k, v in rejected.items()) + ")")
    accuracy = _num(record.accuracy)
    if accuracy is not None:
        parts.append(f"acc {accuracy:.3f}")
    parts += [f"up {human_bytes(_int(record, 'bytes_up'))}", f"down {human_bytes(_int(record, 'bytes_down'))}"]
    seconds = _num(record.duration_seconds)
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _round_axis(ax: Any, rounds: Sequence[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(max(len(rounds), 1), 12)))
    ax.set_xlim(min(rounds, default=1) - 0.6, max(rounds, default=1) + 0.6)
    if len(rounds) <= 1:
        ax.set_xticks([int(r) for r in rounds] or [1])
    ax.set_axisbelow(True)
    ax.grid(True, axis="y", alpha=0.3)


def _mark_abandoned(ax: Any, history: Sequence[Record]) -> bool:
    abandoned = [r.round for r in history if not r.complete]
    for i, rnd in enumerate(abandoned):
        ax.axvspan(rnd - 0.5, rnd + 0.5, color="#ced4da", alpha=0.5, lw=0, zorder=0,
                   label="abandoned round" if i == 0 else None)
    return bool(abandoned)


def _series(history: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    points = [(r.round, v) for r in history if r.complete and (v := _num(getattr(r, key))) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_accuracy_loss(path: Path, history: Sequence[Record], centralized: float | None,
                       centralized_loss: float | None = None, title: str = "") -> None:
    """Two panels: global test accuracy and loss per round, centralized baseline dashed."""
    fig, axes = _figure(11, 4.2, 1, 2)
    acc_ax, loss_ax = axes[0]
    rounds = [r.round for r in history]
    for ax, key, label, baseline in ((acc_ax, "accuracy", "accuracy", centralized),
                                     (loss_ax, "loss", "loss (cross-entropy)", centralized_loss)):
        _mark_abandoned(ax, history)
        xs, ys = _series(history, key)
        ax.plot(xs, ys, marker="o", ms=4, lw=2, color=COLORS[key], label=f"federated (global model) {label}")
        if baseline is not None:
            ax.axhline(baseline, ls="--", lw=1.5, color=COLORS["baseline"], label=f"centralized {baseline:.3f}")
        if ys:  # final value, left of the last point, on the side away from the axis edge it approaches
            ax.annotate(f"final {ys[-1]:.3f}", (xs[-1], ys[-1]), textcoords="offset points",
                        xytext=(-6, -16 if key == "accuracy" else 8), ha="right", fontsize=9, color=COLORS[key])
        if not ys:
            ax.text(0.5, 0.5, "no completed round", transform=ax.transAxes, ha="center", va="center",
                    color="#868e96")
        _round_axis(ax, rounds)
        ax.set_ylabel(f"test {label}")
        ax.set_title(f"Global test {key} per round")
        ax.legend(loc="best", fontsize=9)
    low = min([*_series(history, "accuracy")[1], *([centralized] if centralized is not None else []), 1.0])
    acc_ax.set_ylim(max(0.0, min(low, 0.9) - 0.05), 1.0)
    loss_ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.savefig(path)


def plot_bytes(path: Path, history: Sequence[Record], title: str = "") -> None:
    """Grouped bars of bytes uploaded (clients -> server) and downloaded (server -> clients) per round."""
    import numpy as np

    fig, axes = _figure(9, 4.2)
    ax = axes[0][0]
    rounds = np.array([r.round for r in history])
    up = np.array([_int(r, "bytes_up") for r in history], dtype=float)
    down = np.array([_int(r, "bytes_down") for r in history], dtype=float)
    unit, scale = _unit(max([*up, *down, 0.0]))
    series = ((up, -1, "up", f"up: client updates (total {human_bytes(up.sum())})"),
              (down, 1, "down", f"down: global model to clients (total {human_bytes(down.sum())})"))
    for values, side, key, label in series:
        if len(rounds) > MANY_ROUNDS:
            ax.plot(rounds, values / scale, lw=1.5, color=COLORS[key], label=label)
        else:
            ax.bar(rounds + side * 0.2, values / scale, 0.4, color=COLORS[key], label=label)
    _round_axis(ax, list(rounds))
    ax.set_ylabel(f"bytes per round ({unit})")
    ax.set_title(title or "Traffic per round")
    ax.legend(loc="upper left", fontsize=9)
    ax.set_ylim(0, max(1.0, float(max([*up, *down, 0.0])) / scale) * 1.18)  # headroom for the legend
    fig.savefig(path)


def float32_traffic(record: Record, params: int) -> int:
    """What a round's traffic would be with float32 updates and weights (4 bytes per parameter each way)."""
    return 4 * params * (record.accepted + record.downloads)


def plot_bytes_accuracy(path: Path, history: Sequence[Record], params: int | None = None, title: str = "") -> None:
    """Global test accuracy against the cumulative traffic (up + down) it cost; float32 traffic grey when known."""
    import numpy as np

    fig, axes = _figure(9, 4.2)
    ax = axes[0][0]
    spent = np.cumsum([_int(r, "bytes_up") + _int(r, "bytes_down") for r in history], dtype=float)
    dense = np.cumsum([float32_traffic(r, params) for r in history], dtype=float) if params else None
    unit, scale = _unit(max([*spent, *(dense if dense is not None else []), 0.0]))
    points = [(x, a) for x, r in zip(spent, history, strict=True) if r.complete and (a := _num(r.accuracy)) is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(np.array(xs) / scale, ys, marker="o", ms=4, lw=2, color=COLORS["accuracy"],
                label=f"this run ({human_bytes(spent[-1])} in all)")
        if dense is not None:
            xd = [d for d, r in zip(dense, history, strict=True) if r.complete and _num(r.accuracy) is not None]
            ax.plot(np.array(xd) / scale, ys, ls="--", lw=1.5, color=COLORS["float32"],
                    label=f"the same rounds in float32 ({human_bytes(dense[-1])})")
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no completed round", transform=ax.transAxes, ha="center", va="center", color="#868e96")
    ax.set_xlim(left=0)
    ax.set_xlabel(f"cumulative traffic, up + down ({unit})")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "Accuracy per byte")
    fig.savefig(path)


def plot_accuracy_time(path: Path, history: Sequence[Record], title: str = "") -> None:
    """Global test accuracy against the wall time since the first round began (sync and FedBuff runs compare)."""
    fig, axes = _figure(9, 4.2)
    ax = axes[0][0]
    start = min((r.started_at for r in history if r.started_at), default=0.0)
    points = [(r.completed_at - start, a) for r in history
              if r.complete and r.completed_at and (a := _num(r.accuracy)) is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, lw=2, color=COLORS["accuracy"], label=f"final {ys[-1]:.3f} at {xs[-1]:.0f} s")
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no completed round", transform=ax.transAxes, ha="center", va="center", color="#868e96")
    ax.set_xlim(left=0)
    ax.set_xlabel("wall time since the first round began (s)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "Accuracy over time")
    fig.savefig(path)


def plot_participation(path: Path, history: Sequence[Record], title: str = "") -> None:
    """Top: selected / accepted / declined / aborted / timed out / cut off per round. Bottom: declines by gate."""
    participation_figure(history, title).savefig(path)


def participation_figure(history: Sequence[Record], title: str = "") -> Any:
    """The participation plot's figure (`plot_participation` saves it)."""
    import numpy as np

    fig, axes = _figure(11, 7.2, 2, 1)
    top, bottom = axes[0][0], axes[1][0]
    rounds = np.array([r.round for r in history])
    kinds = ["accepted", "declined", "aborted", "timed_out", "cut_off"]
    rejected = np.array([sum(_counter(r, "rejected").values()) for r in history])
    if rejected.sum():
        kinds.append("rejected")
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        values = rejected if kind == "rejected" else np.array([_int(r, kind) for r in history])
        if len(rounds) > MANY_ROUNDS:
            top.plot(rounds, values, lw=1.2, color=COLORS[kind], label=LABELS.get(kind, kind))
        else:
            top.bar(rounds + (i - (len(kinds) - 1) / 2) * width, values, width, color=COLORS[kind],
                    label=LABELS.get(kind, kind))
    top.step(rounds, [_int(r, "selected") for r in history], where="mid", color=COLORS["selected"], lw=1.5,
             label="selected")
    _mark_abandoned(top, history)
    _round_axis(top, list(rounds))
    top.set_ylabel("clients")
    top.set_title("Participation per round")
    top.set_ylim(bottom=0)
    if history:
        top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    else:
        top.text(0.5, 0.5, "no rounds", transform=top.transAxes, ha="center", va="center", color="#868e96")
    _plot_gates(bottom, history, rounds)
    if title:
        fig.suptitle(title)
    return fig


def _plot_gates(ax: Any, history: Sequence[Record], rounds: Any) -> None:
    """Stacked bars: why clients declined, by gate."""
    import numpy as np

    gates = sorted({g for r in history for g in _counter(r, "declined_by_gate")})
    base = np.zeros(len(history))
    colors = ("#e8590c", "#fab005", "#74c0fc", "#b197fc", "#63e6be", "#ffa8a8", "#adb5bd", "#94d82d")
    for i, gate in enumerate(gates):
        values = np.array([_counter(r, "declined_by_gate").get(gate, 0) for r in history])
        width = 1.0 if len(rounds) > MANY_ROUNDS else 0.6
        ax.bar(rounds, values, width, bottom=base, color=colors[i % len(colors)], label=gate)
        base += values
    _round_axis(ax, list(rounds))
    ax.set_ylabel("clients declining")
    ax.set_title("Declines by gate (device policy that said no)")
    if gates:  # legend top-down in the order of the stack
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="gate")
    else:
        ax.text(0.5, 0.5, "no client declined", transform=ax.transAxes, ha="center", va="center", color="#868e96")
    ax.set_ylim(0, max(1.0, float(base.max()) if len(base) else 1.0) * 1.15)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------- report


def write_report(report_dir: str | os.PathLike[str], history: Sequence[Record | Mapping[str, Any]], *,
                 centralized_accuracy: float | Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None,
                 plots: bool = True) -> dict[str, Any]:
    """Write summary.json, history.json and the three PNG plots into `report_dir`; return the summary.

    `centralized_accuracy` is a number or the dict `baseline.centralized_accuracy` returns (its loss is
    then drawn too); `extra` (task, clients, partition, alpha, duration, model paths, ...) goes into the
    summary as given, except where it names a key computed here.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    history = sorted(records(history), key=lambda r: r.round)
    baseline = dict(centralized_accuracy) if isinstance(centralized_accuracy, Mapping) else None
    central = _num(baseline["accuracy"]) if baseline else _num(centralized_accuracy)
    accuracy, loss = final_accuracy(history)
    summary: dict[str, Any] = {**dict(extra or {}), "final_accuracy": accuracy, "final_loss": loss,
                               "centralized_accuracy": central, **totals(history)}
    if baseline:
        summary["centralized"] = baseline
    if accuracy is not None and central is not None:
        summary["gap_to_centralized"] = round(central - accuracy, 4)
    summary["files"] = {"history": HISTORY_FILE}
    if plots:
        caption = _caption(extra or {})
        plot_accuracy_loss(out / PLOTS[0], history, central, _num(baseline.get("loss")) if baseline else None,
                           caption)
        plot_bytes(out / PLOTS[1], history, "Traffic per round" + (f" - {caption}" if caption else ""))
        plot_participation(out / PLOTS[2], history, caption)
        params = (extra or {}).get("params")
        plot_bytes_accuracy(out / PLOTS[3], history, int(params) if params else None,
                            "Accuracy per byte" + (f" - {caption}" if caption else ""))
        plot_accuracy_time(out / PLOTS[4], history, "Accuracy over time" + (f" - {caption}" if caption else ""))
        summary["files"].update({name.removesuffix(".png"): name for name in PLOTS})
    _write_json(out / HISTORY_FILE, [r.to_dict() for r in history])
    _write_json(out / SUMMARY_FILE, summary)
    return _json_safe(summary)


def _caption(extra: Mapping[str, Any]) -> str:
    """e.g. `digits, 10 clients, dirichlet alpha=0.3, fedavg, int8 updates`, from whichever keys `extra` has."""
    parts = [str(extra["task"])] if extra.get("task") else []
    if extra.get("clients"):
        parts.append(f"{extra['clients']} clients")
    if extra.get("partition"):
        part = str(extra["partition"])
        if part == "dirichlet" and extra.get("alpha") is not None:
            part += f" alpha={extra['alpha']}"
        parts.append(part)
    if extra.get("strategy"):
        parts.append(str(extra["strategy"]))
    if extra.get("codec"):
        parts.append(f"{extra['codec']} updates")
    if extra.get("mode") and extra["mode"] != "sync":
        parts.append(str(extra["mode"]))
    return ", ".join(parts)
