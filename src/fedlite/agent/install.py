"""A deploy job, in the agent's child process: fetch the target's int8 model, evaluate it and the replaced one on the
held-out split in the device's TFLite runtime, install it atomically, report (README, "Deployment")."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import numpy as np

from fedlite.agent.data import LocalData
from fedlite.agent.deploy import Deployer, DeployError, sha_of
from fedlite.agent.host import Host, NotDelivered
from fedlite.fsutil import write_atomic
from fedlite.protocol import topics
from fedlite.protocol.codec import decode
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.messages import DeployTarget, DeviceReport, to_json

log = logging.getLogger("fedlite.agent.deploy")
EVAL_BATCH = 256


def deploy(deployer: Deployer, target: DeployTarget, deployment_id: str, host: Host, data: LocalData) -> None:
    """Install `target` at the deployer's path (the replaced model kept as .previous); raises DeployError."""
    started = time.monotonic()
    model = _model_bytes(deployer, target, host)
    try:  # also proves the runtime loads the model before the device's application gets it
        metrics = {"accuracy_candidate": int8_accuracy(model, data.x_holdout, data.y_holdout)}
    except (ValueError, RuntimeError) as exc:
        raise DeployError(f"the int8 model does not run here: {exc}") from None
    replaced = deployer.path.read_bytes() if deployer.path.is_file() else None
    _install(deployer, model, replaced)
    _save_record(deployer, target, deployment_id)
    if replaced is not None:
        try:
            metrics["accuracy_current"] = int8_accuracy(replaced, data.x_holdout, data.y_holdout)
        except (ValueError, RuntimeError) as exc:
            log.warning("could not evaluate the replaced model: %s", exc)
    finite = {k: v for k, v in metrics.items() if v is not None and np.isfinite(v)}
    log.info("deployed version %d (sha %s) at %s in %.1f s: accuracy %s, replaced model %s", target.version,
             target.sha256[:12], deployer.path, time.monotonic() - started, _fmt(finite.get("accuracy_candidate")),
             _fmt(finite.get("accuracy_current")))
    report = DeviceReport(client_id=deployer.client_id, round=target.version, kind="deployed",
                          reason=f"version {target.version} sha {target.sha256} deployment {deployment_id}",
                          metrics=finite, sent_at=time.time())
    try:
        host.publish(topics.report_topic(deployer.federation, deployer.client_id), to_json(report), timeout=10)
    except NotDelivered as exc:  # installed either way; the aggregator decides at its timeout
        log.warning("could not report deployment of version %d: %s", target.version, exc)


def _model_bytes(deployer: Deployer, target: DeployTarget, host: Host) -> bytes:
    if sha_of(deployer.previous_path) == target.sha256:
        return deployer.previous_path.read_bytes()  # a rollback to the model this device ran before
    host.subscribe(target.model_topic)
    try:
        payload = host.wait(target.model_topic, time.time() + deployer.config.fetch_timeout_seconds)
        if payload is None:
            raise DeployError(f"model {target.sha256[:12]} did not arrive")
        message = decode(payload)
    except ProtocolError as exc:
        raise DeployError(f"model frame refused: {exc}") from None
    finally:
        host.unsubscribe(target.model_topic)
    blob = message.tensors["blob"].tobytes() if message.header.kind == "model" else b""
    if hashlib.sha256(blob).hexdigest() != target.sha256:
        raise DeployError(f"model frame does not hold the int8 model {target.sha256[:12]}")
    return blob


def _install(deployer: Deployer, model: bytes, replaced: bytes | None) -> None:
    """Keep the replaced model at <path>.previous, then swap the new one in with one atomic rename."""
    deployer.path.parent.mkdir(parents=True, exist_ok=True)
    if replaced is not None:
        write_atomic(deployer.previous_path, replaced)
    write_atomic(deployer.path, model)  # the rename itself is fsync'd too: it survives a power cut


def _save_record(deployer: Deployer, target: DeployTarget, deployment_id: str) -> None:
    record = {"version": target.version, "sha256": target.sha256, "deployment_id": deployment_id,
              "path": str(deployer.path), "installed_at": time.time()}
    write_atomic(deployer.record_path, json.dumps(record).encode())


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


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
