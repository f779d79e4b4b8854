"""The model manifest (manifest.json): layout, signatures, files and hashes; numpy only, no TensorFlow.

Layout of an exported model directory:

    train.tflite        trainable float32 model with the signatures below (resource variables)
    infer_int8.tflite   full-integer inference model, int8 input and output
    manifest.json       this module's format

`weights` lists every weight in manifest order with its offset and size in the flat float32
vector that the `get_weights` / `set_weights` signatures exchange; `flatten` / `unflatten` convert
between that vector and a dict of named arrays.

`model_hash` identifies the trainable program independently of the weights baked into it: the
sha256 hex of the canonical JSON (sorted keys, no whitespace) of
{arch, options, input, classes, weights layout, exporter_version, signatures}. Two exports of the
same architecture, shape and options share it whatever their weights; any change to the program's
interface or the exporter's version changes it (a model with `train_plain` and one without it have different
hashes). The bytes of each file are covered by its own sha256 under `files`, not by `model_hash`.

Every model has the signatures SIGNATURE_NAMES; models exported since `train_plain` (one SGD step without the
FedProx term, used by a device whenever mu = 0) have it too and list it under `signatures`, and so do models
exported since `train_head` (the same step on the head alone: the last layer's kernel and bias, the last two
weights in manifest order; what on-device personalization trains).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.fsutil import write_atomic
from fedlite.protocol.layout import flatten, unflatten  # noqa: F401  (re-exported: the manifest layout)

FORMAT = "fedlite-model"
FORMAT_VERSION = 1
EXPORTER_VERSION = "1"
MANIFEST_NAME = "manifest.json"
TRAIN_FILE = "train.tflite"
INFER_INT8_FILE = "infer_int8.tflite"
SIGNATURE_NAMES = ("train", "infer", "evaluate", "get_weights", "set_weights")  # every model has these
PLAIN_TRAIN = "train_plain"  # `train` without the FedProx term; models exported before it lack it
HEAD_TRAIN = "train_head"  # `train_plain` on the last layer's weights alone (personalization); may be absent too
EXPORTED_SIGNATURES = (*SIGNATURE_NAMES, PLAIN_TRAIN, HEAD_TRAIN)  # what the exporter writes

REQUIRED_KEYS = ("format", "format_version", "arch", "options", "input", "classes", "weights", "num_params",
                 "signatures", "files", "model_hash", "exporter_version")


class ManifestError(ValueError):
    """A model directory or manifest that cannot be used."""


def _spec(shape: Sequence[int], dtype: str = "float32") -> dict[str, Any]:
    return {"shape": [int(d) for d in shape], "dtype": dtype}


def signature_specs(input_shape: Sequence[int], classes: int, num_params: int) -> dict[str, dict[str, Any]]:
    """Inputs and outputs of the trainable model's signatures; -1 is the dynamic batch axis."""
    x = _spec([-1, *input_shape])
    y = _spec([-1, classes])
    scalar = _spec([])
    return {
        "train": {"inputs": {"x": x, "y": y, "lr": scalar, "mu": scalar}, "outputs": {"loss": scalar}},
        PLAIN_TRAIN: {"inputs": {"x": x, "y": y, "lr": scalar}, "outputs": {"loss": scalar}},
        HEAD_TRAIN: {"inputs": {"x": x, "y": y, "lr": scalar}, "outputs": {"loss": scalar}},
        "infer": {"inputs": {"x": x}, "outputs": {"logits": y, "probabilities": y}},
        "evaluate": {"inputs": {"x": x, "y": y}, "outputs": {"loss": scalar, "accuracy": scalar}},
        "get_weights": {"inputs": {}, "outputs": {"weights": _spec([num_params])}},
        "set_weights": {"inputs": {"weights": _spec([num_params])}, "outputs": {"num_params": _spec([], "int32")}},
    }


def weight_entries(layout: Sequence[tuple[str, Sequence[int]]]) -> list[dict[str, Any]]:
    entries, offset = [], 0
    for name, shape in layout:
        size = math.prod(shape)
        entries.append({"name": name, "shape": [int(d) for d in shape], "dtype": "float32",
                        "offset": offset, "size": size})
        offset += size
    return entries


def json_safe(value: Any) -> Any:
    """Options as plain JSON values: tuples become lists, numpy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def compute_model_hash(manifest: Mapping[str, Any]) -> str:
    keys = ("arch", "options", "input", "classes", "weights", "exporter_version", "signatures")
    return hashlib.sha256(canonical_json({k: manifest[k] for k in keys})).hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    return {"path": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_manifest(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate `model_dir/manifest.json` (or a manifest file path)."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise ManifestError(f"no model manifest at {path} (export one with `fedlite export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    validate_manifest(manifest, source=str(path))
    return manifest


def validate_manifest(manifest: Any, source: str = "manifest") -> None:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{source}: expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{source}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{source}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this fedlite reads version {FORMAT_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{source}: missing keys {', '.join(missing)}")
    offset = 0
    for entry in manifest["weights"]:
        if entry.get("offset") != offset or entry.get("size") != math.prod(entry.get("shape", [])):
            raise ManifestError(f"{source}: weight {entry.get('name')!r} has an inconsistent offset or size")
        offset += entry["size"]
    if offset != manifest["num_params"]:
        raise ManifestError(f"{source}: num_params {manifest['num_params']} != sum of weight sizes {offset}")
    missing_sigs = [s for s in SIGNATURE_NAMES if s not in manifest["signatures"]]
    if missing_sigs:
        raise ManifestError(f"{source}: missing signatures {', '.join(missing_sigs)}")


def read_model_file(model_dir: str | os.PathLike[str], manifest: Mapping[str, Any], key: str = "train") -> bytes:
    """The bytes of `files[key]`, checked against the manifest's size and sha256."""
    entry = manifest["files"].get(key)
    if entry is None:
        raise ManifestError(f"manifest lists no {key!r} file")
    data = (Path(model_dir) / entry["path"]).read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ManifestError(f"{entry['path']} does not match the manifest's size or sha256")
    return data
