"""A lean virtual fleet for `fedlite simulate`: many devices' MQTT links driven by one thread per process.

Each virtual device is its own MQTT v5 connection, authenticated as itself (the broker's ACL applies), with its
retained status and last will, and follows the protocol as an agent does: it subscribes to the round topic,
verifies each signed announcement, checks the keyed-hash selection, fetches the round's weights from their
retained topic and publishes an update framed with its own header in the round's encoding. What it saves is
the device's cost, so that the broker and the aggregator are what a run measures: one thread per process
drives every link (paho's external event loop), an announcement or weights payload is verified and decoded
once per process rather than once per device, and the process trains one real local update per round (TFLite,
on its devices' pooled examples) that its selected devices then each encode and send.
"""

from __future__ import annotations

import logging
import selectors
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedlite import __version__
from fedlite.agent.models import ModelCache
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import Header, decode, encode_update
from fedlite.protocol.errors import ProtocolError
from fedlite.protocol.layout import flatten
from fedlite.protocol.messages import DeviceStatus, RoundAnnouncement, from_json, to_json
from fedlite.protocol.selection import is_selected
from fedlite.protocol.signing import Verifier

log = logging.getLogger("fedlite.simulate")


@dataclass
class Device:
    """One virtual device: its link and what it has done in the current round."""

    client_id: str
    client: mqtt.Client
    connected: bool = False
    waiting_for: str = ""  # the weights topic it subscribed to for the open round
    done_session: str = ""


@dataclass
class Round:
    """The open round as this process knows it, and the one local update its devices send."""

    announcement: RoundAnnouncement
    delta: dict[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class LeanFleet:
    """Every virtual device of one process, driven by `run` on the calling thread until `stop` is set."""

    def __init__(self, spec: dict[str, Any], x: np.ndarray, y: np.ndarray) -> None:
        self.federation = spec["federation"]
        self.host, self.port = spec["host"], spec["port"]
        self.examples = int(spec["examples_per_client"])
        self.status_interval = float(spec["status_interval_seconds"])
        self.verifier = Verifier.from_files([spec["aggregator_key"]])
        self.models = ModelCache(Path(spec["run_dir"]) / f"models-{spec['worker']}")
        self.rng = np.random.default_rng(spec["worker"])
        pick = self.rng.choice(len(x), size=min(len(x), self.examples * 8), replace=False)
        self.x, self.y = x[pick].astype(np.float32), y[pick].astype(np.int64)
        self.devices = {cid: Device(cid, self._client(cid, password)) for cid, password in spec["devices"].items()}
        self.selector = selectors.DefaultSelector()
        self.round: Round | None = None
        self._verified: dict[tuple[str, bytes], bytes] = {}  # (topic, envelope) -> payload, the latest few
        self._model_requested = ""
        self._parsed: tuple[bytes, RoundAnnouncement] | None = None
        self._pending: list[tuple[Device, str, bytes]] = []

    # --- links ---------------------------------------------------------------------------------------

    def _client(self, client_id: str, password: str) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                             userdata=client_id)
        client.username_pw_set(client_id, password)
        client.will_set(topics.status_topic(self.federation, client_id), to_json(self._status(client_id, "offline")),
                        qos=1, retain=True)
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        return client

    def _status(self, client_id: str, state: str) -> DeviceStatus:
        return DeviceStatus(client_id=client_id, state=state, eligible=state != "offline", num_examples=self.examples,
                            runtime="lean-simulated", agent_version=__version__, updated_at=time.time(),
                            encodings=list(codecs.UPLINK))

    def _connect(self, device: Device) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        device.client.connect(self.host, self.port, keepalive=60, clean_start=True, properties=props)
        self.selector.register(device.client.socket(), selectors.EVENT_READ, device)

    def _on_connect(self, client: mqtt.Client, client_id: str, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("device %s refused by the broker: %s", client_id, reason_code)
            return
        self.devices[client_id].connected = True
        client.subscribe(topics.round_topic(self.federation), qos=1)
        self._publish_status(self.devices[client_id])

    def _publish_status(self, device: Device, state: str = "online") -> None:
        device.client.publish(topics.status_topic(self.federation, device.client_id),
                              to_json(self._status(device.client_id, state)), qos=1, retain=True)

    # --- the event loop ------------------------------------------------------------------------------

    def run(self, stop: Any) -> None:
        for device in self.devices.values():
            self._connect(device)
        next_misc = next_status = time.monotonic()
        while not stop.is_set():
            for key, _ in self.selector.select(timeout=0.05):
                key.data.client.loop_read(100)
            for device in self.devices.values():
                if device.client.want_write():
                    device.client.loop_write()
            now = time.monotonic()
            if now >= next_misc:
                for device in self.devices.values():
                    device.client.loop_misc()
                next_misc = now + 1.0
            if now >= next_status + self.status_interval:
                for device in self.devices.values():
                    if device.connected:
                        self._publish_status(device)
                next_status = now
        for device in self.devices.values():
            device.client.disconnect()
            device.client.loop_write()

    # --- the protocol --------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, client_id: str, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        device = self.devices[client_id]
        try:
            if message.topic == topics.round_topic(self.federation):
                self._follow(device, self._announcement(message.topic, message.payload))
            elif message.topic == device.waiting_for:
                self._send_update(device, message.topic, message.payload)
        except ProtocolError as exc:
            log.warning("device %s refused a message on %s: %s", client_id, message.topic, exc)

    def _verify(self, topic: str, envelope: bytes) -> bytes:
        """The signed payload, verified once per process however many devices received it."""
        key = (topic, envelope)
        if key not in self._verified:
            if len(self._verified) >= 8:
                self._verified.pop(next(iter(self._verified)))  # the oldest
            self._verified[key] = self.verifier.verify(topic, envelope)
        return self._verified[key]

    def _announcement(self, topic: str, envelope: bytes) -> RoundAnnouncement:
        """The verified announcement, parsed once per process however many devices received it."""
        if self._parsed is None or self._parsed[0] != envelope:
            self._parsed = (envelope, from_json(RoundAnnouncement, self._verify(topic, envelope)))
        return self._parsed[1]

    def _follow(self, device: Device, a: RoundAnnouncement) -> None:
        if self.round is None or self.round.announcement.session != a.session:
            self.round = Round(a)
            self._pending = []
        if device.waiting_for:
            device.client.unsubscribe(device.waiting_for)
            device.waiting_for = ""
        if (a.state == "open" and a.federation == self.federation and device.done_session != a.session
                and is_selected(a.selection, device.client_id) and time.time() < a.deadline):
            if not self.models.has(a.model_hash) and self._model_requested != a.model_hash:
                self._model_requested = a.model_hash  # one device of the process fetches it (`_on_model`)
                device.client.message_callback_add(a.model_topic, self._on_model)
                device.client.subscribe(a.model_topic, qos=1)
            device.waiting_for = a.weights_topic
            device.client.subscribe(a.weights_topic, qos=1)

    def _on_model(self, client: mqtt.Client, client_id: str, message: mqtt.MQTTMessage) -> None:
        client.unsubscribe(message.topic)
        model_hash = topics.client_of(message.topic)
        if message.payload and not self.models.has(model_hash):
            try:
                self.models.store(model_hash, self._verify(message.topic, message.payload))
            except ProtocolError as exc:
                log.warning("refused the model on %s: %s", message.topic, exc)
        pending, self._pending = self._pending, []
        for device, topic, envelope in pending:  # weights that came before the model
            self._send_update(device, topic, envelope)

    def _send_update(self, device: Device, topic: str, envelope: bytes) -> None:
        rnd = self.round
        if rnd is None or topic != rnd.announcement.weights_topic:
            return
        if not self.models.has(rnd.announcement.model_hash):
            self._pending.append((device, topic, envelope))  # sent once the model is here (`_on_model`)
            return
        device.client.unsubscribe(topic)
        device.waiting_for = ""
        a = rnd.announcement
        if rnd.delta is None:
            self._train(rnd, self._verify(topic, envelope))
        header = Header(kind="update", federation=self.federation, round=a.round, model_hash=a.model_hash,
                        client_id=device.client_id, num_examples=self.examples, run=a.run, metrics=rnd.metrics,
                        extra={"bytes_down": len(envelope)})
        device.client.publish(topics.update_topic(self.federation, device.client_id),
                              encode_update(rnd.delta, header, encoding=a.plan.encoding), qos=1)
        device.done_session = a.session

    def _train(self, rnd: Round, payload: bytes) -> None:
        """The round's one local update: real TFLite training from the global weights on the pooled examples."""
        from fedlite.runtime.trainer import local_update

        a = rnd.announcement
        message = decode(payload)
        if message.header.kind != "weights" or message.header.round != a.round or message.header.run != a.run:
            raise ProtocolError("stale", f"weights for round {message.header.round} of another run or round")
        trainer, manifest = self.models.trainer(a.model_hash)
        global_flat = flatten(message.tensors, manifest)
        plan = a.plan
        rnd.delta, result = local_update(trainer, global_flat, self.x, self.y, min(plan.epochs, 1), plan.batch_size,
                                         plan.learning_rate, plan.proximal_mu, self.rng)
        rnd.metrics = {"train_loss": float(result.loss), "steps": float(result.steps)}
