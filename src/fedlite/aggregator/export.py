"""Versioned model directories: the initial export, TFLite re-exports of rounds' models, redoing missed ones."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.checkpoint import CheckpointError, list_checkpoints, verify
from fedlite.aggregator.config import ModelSection
from fedlite.fsutil import StorageError, ensure_dir, write_atomic
from fedlite.protocol.manifest import MANIFEST_NAME

log = logging.getLogger("fedlite.aggregator.export")

METRICS_FILE = "metrics.json"  # written last: a version directory without it is unfinished


def version_dir(models_dir: Path, round_number: int) -> Path:
    return models_dir / f"round-{round_number:05d}"


def export_round(spec: ModelSection, out_dir: Path, weights: dict[str, np.ndarray] | None,
                 representative: np.ndarray | None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """train.tflite + infer_int8.tflite + manifest.json (+ metrics.json) for `weights` (None: the seed's initial
    weights). Every file is written atomically; a storage failure raises StorageError."""
    from fedlite.model_export.builders import load_builder
    from fedlite.model_export.convert import export_model

    builder = load_builder(spec.builder) if spec.builder else None  # made absolute by `config.load_config`
    ensure_dir(out_dir)
    manifest = export_model(spec.arch, spec.input_shape, spec.classes, out_dir, weights=weights,
                            representative=representative, seed=spec.seed, options=spec.options, builder=builder)
    if metrics is not None:
        write_atomic(out_dir / METRICS_FILE, json.dumps(metrics, indent=1, sort_keys=True).encode())
    return manifest


def exported_rounds(done: int, export_every: int, total: int) -> list[int]:
    """The completed rounds (1..done) that have an export: every `export_every`-th one and the final round."""
    return [n for n in range(1, done + 1) if (export_every and n % export_every == 0) or n == total]


def export_complete(folder: Path) -> bool:
    """Whether a round's version directory holds its whole export: the manifest, every file it lists at its
    recorded size (each is written atomically, so a file is either whole or absent), and metrics.json."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        files = manifest["files"].values()
        return (folder / METRICS_FILE).is_file() and all((folder / f["path"]).stat().st_size == f["bytes"]
                                                         for f in files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class Exporter:
    """Re-exports in a background thread so a slow TFLite conversion never holds a round open.

    A storage failure (disk full, read-only, ...) ends the thread: it is kept in `failure` and handed to
    `on_failure`, so that the main loop stops at once. Any other failure of one export is logged and counted.
    """

    def __init__(self, spec: ModelSection, models_dir: Path, representative: np.ndarray | None,
                 on_failure: Callable[[StorageError], None] | None = None) -> None:
        self.spec = spec
        self.models_dir = models_dir
        self.representative = representative
        self.on_failure = on_failure
        self.failures = 0
        self.failure: StorageError | None = None
        self.exported: list[int] = []
        self._queue: queue.Queue[tuple[int, dict[str, np.ndarray], dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="exporter", daemon=True)
        self._thread.start()

    def submit(self, round_number: int, weights: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
        self._queue.put((round_number, {k: v.copy() for k, v in weights.items()}, metrics))

    def close(self, keep_alive: Callable[[], None] = lambda: None, wait: bool = True, timeout: float = 300.0) -> None:
        """Finish pending exports (unless `wait` is False), calling `keep_alive` at least every second (the
        systemd watchdog); return as soon as an export hits a storage failure."""
        self._queue.put(None)
        end = time.monotonic() + timeout
        while wait and self._thread.is_alive() and self.failure is None and time.monotonic() < end:
            keep_alive()
            self._thread.join(0.25)
        if self._thread.is_alive() and wait and self.failure is None:
            log.warning("exports still pending after %.0f s; they are redone at the next start", timeout)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            round_number, weights, metrics = job
            target = version_dir(self.models_dir, round_number)
            try:
                manifest = export_round(self.spec, target, weights, self.representative, metrics)
            except StorageError as exc:  # every later export would fail the same way: stop, let the main loop know
                self.failure = StorageError(f"export of round {round_number} failed: {exc}", exc.path, exc.cause)
                log.warning("export of round %d hit a storage failure: the aggregator stops", round_number)
                if self.on_failure is not None:
                    self.on_failure(self.failure)
                return
            except Exception:  # any other export failure must not stop training; it is logged and counted
                self.failures += 1
                log.exception("export of round %d failed", round_number)
                continue
            self.exported.append(round_number)
            log.info("round %d exported to %s (int8 inference model %d B)", round_number, target,
                     manifest["files"]["infer_int8"]["bytes"])


def redo_missed_exports(exporter: Exporter, checkpoints_dir: Path, history: list[dict[str, Any]], done: int,
                        total: int) -> list[int]:
    """Queue the re-export of every completed round whose export should exist but is missing or unfinished
    (e.g. the disk filled up during it), from its checkpoint; the rounds queued. Rounds whose checkpoint is no
    longer kept cannot be redone: they are named in one warning."""
    missing = [n for n in exported_rounds(done, exporter.spec.export_every, total)
               if not export_complete(version_dir(exporter.models_dir, n))]
    if not missing:
        return []
    kept = dict(list_checkpoints(checkpoints_dir))
    records = {r.get("round"): r for r in history if r.get("status") == "complete"}
    redone, gone = [], []
    for number in missing:
        try:
            ckpt = verify(number, kept[number]) if number in kept else None
        except CheckpointError as exc:
            log.warning("cannot redo the export of round %d: %s", number, exc)
            ckpt = None
        if ckpt is None:
            gone.append(number)
            continue
        record = records.get(number, {})
        exporter.submit(number, ckpt.weights, {"round": number} | {k: record.get(k) for k in ("accuracy", "loss")})
        redone.append(number)
    if redone:
        log.info("re-exporting round%s %s: %s missing or unfinished", "s" if len(redone) > 1 else "",
                 ", ".join(map(str, redone)), "their exports are" if len(redone) > 1 else "its export is")
    if gone:
        log.warning("the exports of round%s %s are missing and cannot be redone: their weights are no longer kept "
                    "(checkpoints keep only the newest rounds)", "s" if len(gone) > 1 else "",
                    ", ".join(map(str, gone)))
    return redone
