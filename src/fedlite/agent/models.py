"""The device's cache of trainable models, keyed by model hash, so a model crosses the network once.

The agent lists it (`cached_models`) without numpy; a round's process stores and loads models (`ModelCache`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MAX_CACHED_MODELS = 3


class ModelCache:
    def __init__(self, directory: Path, threads: int = 1) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self._loaded: tuple[str, Any, dict[str, Any]] | None = None

    def has(self, model_hash: str) -> bool:
        return (self.directory / model_hash / "manifest.json").is_file()

    def store(self, model_hash: str, payload: bytes) -> None:
        """Check a model message against its hash and manifest, then write it atomically."""
        if not self.has(model_hash):
            self._store(model_hash, payload)

    def _store(self, model_hash: str, payload: bytes) -> None:
        from fedlite.protocol.codec import CodecError, decode

        message = decode(payload)
        header = message.header
        manifest = header.extra.get("manifest")
        if header.kind != "model" or header.model_hash != model_hash or not isinstance(manifest, dict):
            raise CodecError("model", f"not the model {model_hash[:12]} with a manifest")
        blob = message.tensors["blob"].tobytes()
        expected = manifest.get("files", {}).get("train", {}).get("sha256")
        if hashlib.sha256(blob).hexdigest() != expected:
            raise CodecError("model", "train.tflite does not match the sha256 in its manifest")
        if manifest.get("model_hash") != model_hash:
            raise CodecError("model", "manifest names another model hash")
        tmp = self.directory / f".{model_hash}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "train.tflite").write_bytes(blob)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        os.replace(tmp, self.directory / model_hash)
        self._evict(keep=model_hash)

    def trainer(self, model_hash: str) -> tuple[Any, dict[str, Any]]:
        """A Trainer for the cached model (kept loaded while the model stays the same)."""
        if self._loaded is None or self._loaded[0] != model_hash:
            from fedlite.runtime.trainer import Trainer

            folder = self.directory / model_hash
            manifest = json.loads((folder / "manifest.json").read_text())
            trainer = Trainer((folder / "train.tflite").read_bytes(), manifest, num_threads=self.threads)
            self._loaded = (model_hash, trainer, manifest)
        return self._loaded[1], self._loaded[2]

    def _evict(self, keep: str) -> None:
        folders = sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name != keep),
                         key=lambda p: p.stat().st_mtime)
        for old in folders[: max(0, len(folders) - (MAX_CACHED_MODELS - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def cached_models(directory: Path) -> list[str]:
    """The model hashes in the cache at `directory`, read without loading any."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if (p / "manifest.json").is_file())
