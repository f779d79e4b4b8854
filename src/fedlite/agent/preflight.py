"""`fedlite agent --check`: what the agent needs, checked before it matters, one line per check.

The configuration, the local data, the pinned keys, the gates (with their readings), the broker login over
TLS, and whether the data fits the models the broker holds for the federation. The login uses a clean session
(it never takes over the agent's persistent one); a running agent with the same credentials is disconnected
once by it and reconnects.
"""

from __future__ import annotations

import queue
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlite.protocol import topics

PASS, FAIL, INFO = "ok", "FAIL", "--"
RETAINED_WAIT_SECONDS = 3.0  # how long the broker is given to send its retained models


@dataclass(frozen=True)
class Check:
    status: str  # ok | FAIL | -- (nothing to check yet, or a reading)
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


def run_checks(config_path: str | Path) -> list[Check]:
    """Every check that can run (the later ones need the configuration)."""
    from fedlite.agent.config import load_config
    from fedlite.settings import ConfigError

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Check(FAIL, "config", str(exc))]
    checks = [Check(PASS, "config", f"{config_path}: device {config.device.client_id}, federation "
                                    f"{config.device.federation}")]
    data, data_check = _data(config)
    verifier, trust_check = _trust(config)
    checks += [_runtime(), data_check, trust_check, *_gates(config)]
    login, models = _broker(config)
    checks.append(login)
    if login.status == PASS:
        checks.append(_fit(data, models, verifier))
    return checks


def _runtime() -> Check:
    from fedlite.runtime.interpreter import RuntimeMissing, probe_runtime

    try:
        return Check(PASS, "runtime", probe_runtime())
    except RuntimeMissing as exc:
        return Check(FAIL, "runtime", str(exc))


def _data(config: Any) -> tuple[Any, Check]:
    from fedlite.agent.data import DataError, load_local_data

    try:
        data = load_local_data(config.data)
    except (DataError, OSError, ValueError) as exc:
        return None, Check(FAIL, "data", str(exc))
    shape = list(data.x_train.shape[1:])
    return data, Check(PASS, "data", f"{len(data.x_train)} training and {len(data.x_holdout)} held-out examples "
                                     f"of shape {shape}, labels {_labels(data)}")


def _labels(data: Any) -> str:
    labels = [int(y) for part in (data.y_train, data.y_holdout) for y in (part.min(), part.max()) if len(part)]
    return f"{min(labels)}..{max(labels)}" if labels else "none"


def _trust(config: Any) -> tuple[Any, Check]:
    from fedlite.protocol.signing import Verifier

    keys = config.trust.aggregator_keys
    if not keys:
        return None, Check(INFO, "trust", "no pinned key: unsigned broadcasts accepted (trust.allow_unsigned)")
    try:
        verifier = Verifier.from_files(keys)
    except (OSError, ValueError) as exc:
        return None, Check(FAIL, "trust", f"cannot load a pinned key: {exc}")
    return verifier, Check(PASS, "trust", f"{len(keys)} pinned aggregator key(s): {', '.join(keys)}")


def _gates(config: Any) -> list[Check]:
    from fedlite.agent.gates import GATES
    from fedlite.agent.service import _state_provider

    try:
        reading = _state_provider(config).read()
    except (OSError, ValueError) as exc:
        return [Check(FAIL, "gates", f"cannot read the device state: {exc}")]
    checks = []
    for name, gate in GATES.items():
        reason = gate(reading, config.gates)
        checks.append(Check(INFO, f"gate {name}", f"closed: {reason} (the agent waits)" if reason else "open"))
    return checks


def _broker(config: Any) -> tuple[Check, dict[str, bytes]]:
    """The login (clean session, no last will) and the retained models it then reads: {topic: payload}."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedlite.agent.service import _broker_settings

    try:
        s = _broker_settings(config)
    except (OSError, ValueError) as exc:
        return Check(FAIL, "broker", f"cannot read the credentials: {exc}"), {}
    where = f"{s.host}:{s.port} ({'TLS' if s.tls else 'plain'}) as {s.username}"
    answer: queue.Queue[Any] = queue.Queue()
    models: dict[str, bytes] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.device.client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(s.username, s.password)
    client.on_connect = lambda c, u, flags, reason, props: answer.put(reason)
    client.on_message = lambda c, u, m: models.__setitem__(m.topic, bytes(m.payload)) if m.payload else None
    try:
        if s.tls:
            client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.connect(s.host, s.port, keepalive=30, clean_start=True)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return Check(FAIL, "broker", f"{where}: {exc}"), {}
    client.loop_start()
    try:
        reason = answer.get(timeout=10)
    except queue.Empty:
        reason = None
    try:
        if reason is None or reason.is_failure:
            return Check(FAIL, "broker", f"{where}: {reason or 'no answer in 10 s'}"), {}
        client.subscribe(f"{topics.ROOT}/{config.device.federation}/model/+", qos=1)
        time.sleep(RETAINED_WAIT_SECONDS)
        return Check(PASS, "broker", f"logged in to {where}"), dict(models)
    finally:
        client.disconnect()
        client.loop_stop()


def _fit(data: Any, models: dict[str, bytes], verifier: Any) -> Check:
    """Whether the data fits every model the broker holds for the federation (signed by a pinned key)."""
    from fedlite.agent.round import data_mismatch
    from fedlite.protocol.codec import Limits, read_header
    from fedlite.protocol.errors import ProtocolError

    if data is None:
        return Check(INFO, "data fits the model", "not checked: the data did not load")
    if not models:
        return Check(INFO, "data fits the model", "no model on the broker yet: checked by the agent when one comes")
    problems, fits = [], []
    for topic, payload in sorted(models.items()):
        try:
            body = verifier.verify(topic, payload) if verifier is not None else payload
            header = read_header(body, limits=Limits(max_payload_bytes=1 << 31))
        except ProtocolError as exc:
            problems.append(f"model on {topic} refused: {exc}")
            continue
        manifest = header.extra.get("manifest")
        mismatch = data_mismatch(data, manifest) if isinstance(manifest, dict) else "no manifest in the model frame"
        (problems if mismatch else fits).append(f"model {header.model_hash[:12]}: {mismatch or 'fits'}")
    if problems:
        return Check(FAIL, "data fits the model", "; ".join(problems))
    return Check(PASS, "data fits the model", "; ".join(fits))
