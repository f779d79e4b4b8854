"""Deployment of the inference model on a device: follow the aggregator's signed deploy instructions.

The deploy topic holds one retained `DeployInstruction`. This device's target is the canary model if it
is one of the listed canary devices, else the stable model. When the target's sha256 differs from the
installed model's, the agent fetches the signed model frame (or reuses ``<path>.previous`` when that is
the target, as in a rollback), checks the sha256, installs it atomically at ``[deploy] path`` (temporary
file, fsync, rename; the replaced model kept at ``<path>.previous``), evaluates the new and the replaced
model on its held-out split with the int8 model in the device's TFLite runtime, and reports
``DeviceReport(kind="deployed", round=<version>, metrics={"accuracy_candidate", "accuracy_current"})``.

The network thread only hands the raw instruction over (`offer`); the agent's own thread picks the target
(`apply_pending`) and a deploy job in its child process fetches, evaluates and installs it (`agent.install`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlite.protocol import topics
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import DeployInstruction, DeployTarget, from_json

log = logging.getLogger("fedlite.agent.deploy")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class DeploySection:
    """`[deploy]` in agent.toml: where the device's application reads its inference model."""

    enabled: bool = True
    path: str = ""  # default: <state_dir>/deploy/current.tflite
    fetch_timeout_seconds: float = 60.0

    def validate(self) -> None:
        if self.fetch_timeout_seconds <= 0:
            raise ValueError("fetch_timeout_seconds must be > 0")


class DeployError(Exception):
    """A deployment this device could not carry out; the installed model stays as it was."""


class Deployer:
    def __init__(self, config: DeploySection, state_dir: Path, client_id: str, federation: str) -> None:
        self.config = config
        self.client_id = client_id
        self.federation = federation
        self.path = Path(config.path) if config.path else state_dir / "deploy" / "current.tflite"
        self.previous_path = self.path.with_name(self.path.name + ".previous")
        self.record_path = state_dir / "deploy.json"
        self._pending: bytes | None = None
        self._lock = threading.Lock()
        self.deployed_model = sha_of(self.path) or ""  # sha256 of the installed model (the status field)
        self.failures: dict[str, int] = {}  # sha256 -> failed attempts, so a bad target is not retried forever

    # --- hand-over from the network thread -------------------------------------------------------

    def offer(self, payload: bytes) -> None:
        if payload and self.config.enabled:
            with self._lock:
                self._pending = payload

    def apply_pending(self, verify: Callable[[str, bytes], bytes],
                      install: Callable[[DeployTarget, str], None]) -> bool:
        """Carry out the latest instruction, if any (its signature checked by `verify`, the model installed by
        `install(target, deployment_id)`, which raises DeployError); True when the installed model changed."""
        with self._lock:
            payload, self._pending = self._pending, None
        if payload is None:
            return False
        topic = topics.deploy_topic(self.federation)
        try:
            instruction = from_json(DeployInstruction, verify(topic, payload))
            target = self.target(instruction)
        except (ProtocolError, DeployError) as exc:
            log.warning("ignored a deploy instruction: %s", exc)
            return False
        if target is None or target.sha256 == self.deployed_model or self.failures.get(target.sha256, 0) >= 3:
            return False
        try:
            install(target, instruction.deployment_id)
        except DeployError as exc:
            self.failures[target.sha256] = self.failures.get(target.sha256, 0) + 1
            log.error("deployment of version %d failed: %s", target.version, exc)
            return False
        self.deployed_model = sha_of(self.path) or ""
        return True

    def target(self, instruction: DeployInstruction) -> DeployTarget | None:
        """The model this device should run: the canary if it is listed, else the stable one (checked)."""
        if instruction.federation != self.federation:
            raise DeployError(f"instruction for federation {instruction.federation!r}")
        canary = instruction.canary
        if canary is not None and self.client_id in canary.devices:
            chosen: DeployTarget | None = DeployTarget(canary.version, canary.sha256, canary.model_topic)
        else:
            chosen = instruction.stable
        if chosen is not None and not self._well_formed(chosen):
            raise DeployError(f"version {chosen.version}: bad sha256 or model topic")
        return chosen

    def _well_formed(self, target: DeployTarget) -> bool:
        return bool(_SHA256.match(target.sha256)) and target.model_topic == topics.model_topic(self.federation,
                                                                                              target.sha256)


def sha_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
