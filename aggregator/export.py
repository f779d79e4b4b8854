"""Versioned model directories: the initial export, and a TFLite re-export of each round's global model."""

from __future__ import annotations

import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.config import ModelSection

log = logging.getLogger("fedlite.aggregator.export")


def version_dir(models_dir: Path, round_number: int) -> Path:
    return models_dir / f"round-{round_number:05d}"


def export_round(spec: ModelSection, out_dir: Path, weights: dict[str, np.ndarray] | None,
                 representative: np.ndarray | None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """train.tflite + infer_int8.tflite + manifest.json for `weights` (None: the seed's initial weights)."""
    from fedlite.model_export.convert import export_model

    builder = _load_builder(spec.builder) if spec.builder else None
    manifest = export_model(spec.arch, spec.input_shape, spec.classes, out_dir, weights=weights,
                            representative=representative, seed=spec.seed, options=spec.options, builder=builder)
    if metrics is not None:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return manifest


def _load_builder(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class Exporter:
    """Re-exports in a background thread so a slow TFLite conversion never holds a round open."""

    def __init__(self, spec: ModelSection, models_dir: Path, representative: np.ndarray | None) -> None:
        self.spec = spec
        self.models_dir = models_dir
        self.representative = representative
        self.failures = 0
        self.exported: list[int] = []
        self._queue: queue.Queue[tuple[int, dict[str, np.ndarray], dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="exporter", daemon=True)
        self._thread.start()

    def submit(self, round_number: int, weights: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
        self._queue.put((round_number, {k: v.copy() for k, v in weights.items()}, metrics))

    def close(self, timeout: float = 300.0) -> None:
        """Finish pending exports, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            round_number, weights, metrics = job
            target = version_dir(self.models_dir, round_number)
            try:
                manifest = export_round(self.spec, target, weights, self.representative, metrics)
                self.exported.append(round_number)
                log.info("round %d exported to %s (int8 inference model %d B)", round_number, target,
                         manifest["files"]["infer_int8"]["bytes"])
            except Exception:  # an export failure must not stop training; it is logged and counted
                self.failures += 1
                log.exception("export of round %d failed", round_number)
