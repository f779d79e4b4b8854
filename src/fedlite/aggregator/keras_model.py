"""`[model] keras`: a run that starts from a user's saved tf.keras model, its architecture and its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.config import ModelSection
from fedlite.settings import ConfigError


def resolve(spec: ModelSection, base_dir: Path, source: str) -> None:
    """Make `spec.keras` absolute (relative to `base_dir`, the configuration's directory) and take the
    architecture, input shape and classes from the model; a file that is missing or does not translate is a
    one-line ConfigError naming `source`."""
    from fedlite.model_export.keras_import import KerasImportError, load, translate

    path = (base_dir / spec.keras).resolve()
    try:
        model_def, _ = translate(load(path))
    except KerasImportError as exc:
        raise ConfigError(f"{source}: model.keras: {exc}") from None
    spec.keras = str(path)
    spec.arch = "keras"
    spec.input_shape = list(model_def.input_shape)
    spec.classes = model_def.classes
    spec.options = dict(model_def.options)


def initial_weights(spec: ModelSection) -> dict[str, np.ndarray] | None:
    """The round-0 weights: the Keras model's own under `[model] keras` (made absolute by `resolve`), else None
    (the seed's initialisation)."""
    if not spec.keras:
        return None
    from fedlite.model_export.keras_import import load, translate

    return translate(load(spec.keras))[1]


def check_same_model(spec: ModelSection, manifest: dict[str, Any], folder: Path) -> None:
    """ResumeRefused unless the run's round-0 model in `folder` is the `[model] keras` model's architecture: a
    changed model.keras starts a new run (`--reset`), it never re-exports old weights into a new architecture."""
    if not spec.keras:
        return
    from fedlite.aggregator.checkpoint import ResumeRefused
    from fedlite.protocol.manifest import json_safe

    same = (manifest.get("arch") == "keras" and manifest.get("options") == json_safe(spec.options)
            and manifest.get("input", {}).get("shape") == spec.input_shape and manifest.get("classes") == spec.classes)
    if not same:
        raise ResumeRefused(f"{spec.keras} is not the model this run started from ({folder}): start once with "
                            "`fedlite aggregator --reset` to move the old state aside and begin a run from it", folder)
