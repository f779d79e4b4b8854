"""The model registry: every exported round is a version, with its metrics, its int8 model's sha256, and the
deployment state (what is deployed, the current rollout, the operator's request queue).

State lives in ``state_dir/registry.json`` (read by the dashboard; keep its shape)::

    {"versions": [{"version", "round", "sha256", "accuracy", "loss", "created_at", "path"}],
     "deployed": int | null,
     "rollout": null | {"candidate", "previous", "canaries", "reports", "state", "started_at", "finished_at",
                        "reason"},
     "requests": [{"id", "action", "version", "requested_at", "state", "message", "handled_at"}]}

Every change is a read-modify-write under an exclusive lock on ``registry.json.lock`` (so the aggregator
and the `fedlite model` CLI can both write), and every write is atomic (`fedlite.fsutil.write_atomic`:
temporary file, fsync, rename, fsync of the directory), so a reader never sees half a file; a failed write
raises `fedlite.fsutil.StorageError`. ``deployments.jsonl`` beside it logs each fleet-wide deployment (the
default target of `fedlite model rollback`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedlite.fsutil import StorageError, append_durably, describe, ensure_dir, write_atomic
from fedlite.protocol.manifest import INFER_INT8_FILE

REGISTRY_FILE = "registry.json"
DEPLOYMENTS_FILE = "deployments.jsonl"
HEARTBEAT_FILE = "rollout.heartbeat"
MAX_REQUESTS = 100
ROLLOUT_STATES = ("canary", "promoted", "rolled_back")
REQUEST_ACTIONS = ("promote", "rollback")
_VERSION_DIR = re.compile(r"^round-(\d{5,})$")


class RegistryError(ValueError):
    """An operation the registry refuses, e.g. an unknown version; the message says why."""


def empty() -> dict[str, Any]:
    return {"versions": [], "deployed": None, "rollout": None, "requests": []}


def find_version(state: dict[str, Any], version: int) -> dict[str, Any]:
    """The entry of `version`; RegistryError naming the known versions otherwise."""
    for entry in state["versions"]:
        if entry["version"] == version:
            return entry
    known = ", ".join(str(v["version"]) for v in state["versions"]) or "none yet"
    raise RegistryError(f"unknown version {version} (known versions: {known})")


def version_entry(folder: Path, now: float | None = None) -> dict[str, Any] | None:
    """The registry entry for an exported round's folder, or None while its export is unfinished."""
    match = _VERSION_DIR.match(folder.name)
    if not match or int(match.group(1)) < 1:
        return None  # round-00000 is the initial (untrained) model, not a version
    try:
        metrics = json.loads((folder / "metrics.json").read_text())  # written last by the exporter
        manifest = json.loads((folder / "manifest.json").read_text())
        blob = (folder / INFER_INT8_FILE).read_bytes()
        made = (folder / "metrics.json").stat().st_mtime  # when the export finished, whenever it is registered
    except (OSError, ValueError):
        return None
    sha = hashlib.sha256(blob).hexdigest()
    if manifest.get("files", {}).get("infer_int8", {}).get("sha256") != sha:
        return None  # mid-rewrite
    number = int(match.group(1))
    return {"version": number, "round": number, "sha256": sha, "accuracy": _number(metrics.get("accuracy")),
            "loss": _number(metrics.get("loss")), "created_at": now or made, "path": str(folder.resolve())}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Registry:
    """registry.json of one aggregator state directory."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / REGISTRY_FILE
        self.models_dir = self.state_dir / "models"

    # --- reading and writing ------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """The current state (no lock needed: writes are atomic renames)."""
        try:
            state = json.loads(self.path.read_text())
        except FileNotFoundError:
            return empty()
        return empty() | state

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Lock, read, let the caller change the state in place, write it back atomically."""
        ensure_dir(self.state_dir)
        lock_path = self.path.with_name(REGISTRY_FILE + ".lock")
        try:
            lock_file = open(lock_path, "a+")  # noqa: SIM115 (the with statement below closes it)
        except OSError as exc:
            raise StorageError(f"cannot open {lock_path}: {describe(exc)}", lock_path, exc) from exc
        with lock_file as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                before = json.dumps(state, sort_keys=True)
                yield state
                if json.dumps(state, sort_keys=True) != before:
                    self._write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, state: dict[str, Any]) -> None:
        write_atomic(self.path, (json.dumps(state, indent=1) + "\n").encode())

    # --- versions -------------------------------------------------------------------------------

    def sync(self) -> list[int]:
        """Register the finished exports under models/ that are not versions yet; the new version numbers."""
        if not self.models_dir.is_dir():
            return []
        known = {v["version"] for v in self.read()["versions"]}
        found = [e for f in sorted(self.models_dir.iterdir()) if f.is_dir()
                 and _VERSION_DIR.match(f.name) and int(f.name.split("-")[1]) not in known
                 and (e := version_entry(f)) is not None]
        if not found:
            return []
        with self.edit() as state:
            known = {v["version"] for v in state["versions"]}
            added = [e for e in found if e["version"] not in known]
            state["versions"] = sorted(state["versions"] + added, key=lambda v: v["version"])
        return [e["version"] for e in added]

    def version(self, number: int) -> dict[str, Any]:
        return find_version(self.read(), number)

    # --- the operator's requests ----------------------------------------------------------------

    def request(self, action: str, version: int | None) -> dict[str, Any]:
        """Queue a promote or rollback for the aggregator's rollout manager; checks the version exists."""
        if action not in REQUEST_ACTIONS:
            raise RegistryError(f"unknown action {action!r}")
        with self.edit() as state:
            if version is not None:
                find_version(state, version)
            entry = {"id": uuid.uuid4().hex[:12], "action": action, "version": version, "requested_at": time.time(),
                     "state": "pending", "message": "", "handled_at": None}
            state["requests"] = (state["requests"] + [entry])[-MAX_REQUESTS:]
        return entry

    def find_request(self, request_id: str) -> dict[str, Any] | None:
        return next((r for r in self.read()["requests"] if r["id"] == request_id), None)

    # --- the deployment log and the rollout manager's heartbeat ---------------------------------

    def log_deployment(self, version: int, how: str) -> None:
        line = json.dumps({"version": version, "how": how, "at": time.time()}) + "\n"
        append_durably(self.state_dir / DEPLOYMENTS_FILE, line.encode())

    def deployments(self) -> list[dict[str, Any]]:
        try:
            lines = (self.state_dir / DEPLOYMENTS_FILE).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def previously_deployed(self, current: int | None) -> int | None:
        """The last version deployed fleet-wide before `current` (the default rollback target)."""
        return next((d["version"] for d in reversed(self.deployments()) if d["version"] != current), None)

    def beat(self) -> None:
        write_atomic(self.state_dir / HEARTBEAT_FILE,
                     json.dumps({"pid": os.getpid(), "updated_at": time.time()}).encode())

    def server_alive(self, max_age: float = 10.0) -> bool:
        """Whether an aggregator's rollout manager has written its heartbeat within `max_age` seconds."""
        try:
            beat = json.loads((self.state_dir / HEARTBEAT_FILE).read_text())
        except (OSError, ValueError):
            return False
        return time.time() - float(beat.get("updated_at", 0)) <= max_age

