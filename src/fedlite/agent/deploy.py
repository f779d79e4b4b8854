"""Deployment of the inference model on a device: follow the aggregator's signed deploy instructions.

The deploy topic holds one retained `DeployInstruction`. This device's target is the canary model if it
is one of the listed canary devices, else the stable model. When the target's sha256 differs from the
installed model's, the agent fetches the signed model frame (or reuses ``<path>.previous`` when that is
the target, as in a rollback), checks the sha256, installs it atomically at ``[deploy] path`` (temporary
file, fsync, rename; the replaced model kept at ``<path>.previous``), evaluates the new and the replaced
model on its held-out split with the int8 model in the device's TFLite runtime, and reports
``DeviceReport(kind="deployed", round=<version>, metrics={"accuracy_candidate", "accuracy_current"})``.

The network thread only hands the raw instruction over (`offer`); everything else runs on the agent's
own thread (`apply_pending`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.fsutil import write_atomic
from fedlite.protocol import topics
from fedlite.protocol.codec import decode
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import DeployInstruction, DeployTarget, DeviceReport, from_json, to_json

log = logging.getLogger("fedlite.agent.deploy")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
EVAL_BATCH = 256


@dataclass
class DeploySection:
    """`[deploy]` in agent.toml: where the device's application reads its inference model."""

    enabled: bool = True
    path: str = ""  # default: <state_dir>/deploy/current.tflite
    fetch_timeout_seconds: float = 60.0

    def validate(self) -> None:
        if self.fetch_timeout_seconds <= 0:
            raise ValueError("fetch_timeout_seconds must be > 0")


@dataclass
class Channel:
    """What a deployment needs from the agent: the broker link, its mailbox, signature checks, local data."""

    link: Any  # fedlite.protocol.transport.Link
    mailbox: Any  # fedlite.agent.service.Mailbox
    verify: Callable[[str, bytes], bytes]  # raises SignatureError
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    stop: threading.Event


class DeployError(Exception):
    """A deployment this device could not carry out; the installed model stays as it was."""


class Deployer:
    def __init__(self, config: DeploySection, state_dir: Path, client_id: str, federation: str) -> None:
        self.config = config
        self.client_id = client_id
        self.federation = federation
        self.path = Path(config.path) if config.path else state_dir / "deploy" / "current.tflite"
        self.previous_path = self.path.with_name(self.path.name + ".previous")
        self._record_path = state_dir / "deploy.json"
        self._pending: bytes | None = None
        self._lock = threading.Lock()
        self.deployed_model = _sha_of(self.path) or ""  # sha256 of the installed model (the status field)
        self.failures: dict[str, int] = {}  # sha256 -> failed attempts, so a bad target is not retried forever

    # --- hand-over from the network thread -------------------------------------------------------

    def offer(self, payload: bytes) -> None:
        if payload and self.config.enabled:
            with self._lock:
                self._pending = payload

    def apply_pending(self, channel: Channel) -> bool:
        """Carry out the latest instruction, if any; True when the installed model changed."""
        with self._lock:
            payload, self._pending = self._pending, None
        if payload is None:
            return False
        topic = topics.deploy_topic(self.federation)
        try:
            instruction = from_json(DeployInstruction, channel.verify(topic, payload))
            target = self.target(instruction)
        except (ProtocolError, DeployError) as exc:
            log.warning("ignored a deploy instruction: %s", exc)
            return False
        if target is None or target.sha256 == self.deployed_model or self.failures.get(target.sha256, 0) >= 3:
            return False
        try:
            self._deploy(target, instruction.deployment_id, channel)
        except DeployError as exc:
            self.failures[target.sha256] = self.failures.get(target.sha256, 0) + 1
            log.error("deployment of version %d failed: %s", target.version, exc)
            return False
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

    # --- one deployment ------------------------------------------------------------------------

    def _deploy(self, target: DeployTarget, deployment_id: str, channel: Channel) -> None:
        started = time.monotonic()
        model = self._model_bytes(target, channel)
        try:  # also proves the runtime loads the model before the device's application gets it
            metrics = {"accuracy_candidate": int8_accuracy(model, channel.x_holdout, channel.y_holdout)}
        except (ValueError, RuntimeError) as exc:
            raise DeployError(f"the int8 model does not run here: {exc}") from None
        replaced = self.path.read_bytes() if self.path.is_file() else None
        self._install(model, replaced)
        self.deployed_model = target.sha256
        self._save_record(target, deployment_id)
        if replaced is not None:
            try:
                metrics["accuracy_current"] = int8_accuracy(replaced, channel.x_holdout, channel.y_holdout)
            except (ValueError, RuntimeError) as exc:
                log.warning("could not evaluate the replaced model: %s", exc)
        finite = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
        log.info("deployed version %d (sha %s) at %s in %.1f s: accuracy %s, replaced model %s", target.version,
                 target.sha256[:12], self.path, time.monotonic() - started, _fmt(finite.get("accuracy_candidate")),
                 _fmt(finite.get("accuracy_current")))
        report = DeviceReport(client_id=self.client_id, round=target.version, kind="deployed",
                              reason=f"version {target.version} sha {target.sha256} deployment {deployment_id}",
                              metrics=finite, sent_at=time.time())
        try:
            channel.link.publish(topics.report_topic(self.federation, self.client_id), to_json(report), timeout=10)
        except Exception as exc:  # installed either way; the aggregator decides at its timeout
            log.warning("could not report deployment of version %d: %s", target.version, exc)

    def _model_bytes(self, target: DeployTarget, channel: Channel) -> bytes:
        if _sha_of(self.previous_path) == target.sha256:
            return self.previous_path.read_bytes()  # a rollback to the model this device ran before
        channel.link.subscribe(target.model_topic)
        try:
            payload = channel.mailbox.wait(target.model_topic, time.time() + self.config.fetch_timeout_seconds,
                                           channel.stop)
        finally:
            channel.link.unsubscribe(target.model_topic)
        if payload is None:
            raise DeployError(f"model {target.sha256[:12]} did not arrive")
        try:
            message = decode(channel.verify(target.model_topic, payload))
        except ProtocolError as exc:
            raise DeployError(f"model frame refused: {exc}") from None
        blob = message.tensors["blob"].tobytes() if message.header.kind == "model" else b""
        if hashlib.sha256(blob).hexdigest() != target.sha256:
            raise DeployError(f"model frame does not hold the int8 model {target.sha256[:12]}")
        return blob

    def _install(self, model: bytes, replaced: bytes | None) -> None:
        """Keep the replaced model at <path>.previous, then swap the new one in with one atomic rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if replaced is not None:
            write_atomic(self.previous_path, replaced)
        write_atomic(self.path, model)  # the rename itself is fsync'd too: it survives a power cut

    def _save_record(self, target: DeployTarget, deployment_id: str) -> None:
        record = {"version": target.version, "sha256": target.sha256, "deployment_id": deployment_id,
                  "path": str(self.path), "installed_at": time.time()}
        write_atomic(self._record_path, json.dumps(record).encode())


def int8_accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float | None:
    """Accuracy of a full-integer model on (x, y) in this device's TFLite runtime; None without examples."""
    if len(x) == 0:
        return None
    from fedlite.runtime.interpreter import load_interpreter

    interpreter = load_interpreter(model)
    signatures = interpreter.get_signature_list()
    key = next(iter(signatures))
    (name,) = signatures[key]["inputs"]
    runner = interpreter.get_signature_runner(key)
    scale, zero = _input_quantization(interpreter)
    correct = 0
    for start in range(0, len(x), EVAL_BATCH):
        batch = np.asarray(x[start : start + EVAL_BATCH], np.float32)
        q = np.clip(np.round(batch / scale + zero), -128, 127).astype(np.int8)
        out = next(iter(runner(**{name: q}).values()))
        correct += int(np.sum(np.argmax(out, axis=1) == y[start : start + EVAL_BATCH]))
    return correct / len(x)


def _input_quantization(interpreter: Any) -> tuple[float, int]:
    scale, zero = interpreter.get_input_details()[0]["quantization"]
    if not scale:
        raise ValueError("the model's input is not int8-quantized")
    return float(scale), int(zero)


def _sha_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
