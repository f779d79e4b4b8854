"""MQTT v5 link used by agents, the simulator and the aggregator: QoS 1, TLS, acknowledged publishes."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("fedlite.transport")

MessageHandler = Callable[[str, bytes], None]
EARLY_ACKS = 1024  # PUBACKs kept for publishes not yet waiting (mids are sequential: far fewer than 65,535)
PACKET_OVERHEAD = 64  # fixed header, topic length, packet id and properties beyond the topic itself


class LinkError(RuntimeError):
    """The broker refused the connection or could not be reached."""


class PublishRefused(RuntimeError):
    """The broker answered a publish with a failure reason code (e.g. 135 Not authorized)."""

    def __init__(self, topic: str, reason_code: int, reason: str) -> None:
        super().__init__(f"publish to {topic} refused by the broker: {reason} ({reason_code})")
        self.reason_code = reason_code


class PayloadTooLarge(ValueError):
    """A payload larger than the broker's advertised maximum packet size."""


@dataclass
class BrokerSettings:
    host: str = "localhost"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    session_expiry: int = 3600
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    extra: dict[str, str] = field(default_factory=dict)


def _no_delay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    """Small packets (PUBACKs, claims) leave at once instead of waiting on Nagle's algorithm."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Link:
    """One MQTT v5 connection with a persistent session, resubscribed after every reconnect."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        on_message: MessageHandler,
        *,
        will: tuple[str, bytes] | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        """`on_connect` is called on the network thread after every (re)connect; it must not block."""
        self.settings = settings
        self._on_connect = on_connect
        self.client_id = client_id
        self.max_packet_size: int | None = None
        self.connected = threading.Event()
        self._on_message = on_message
        self._subscriptions: dict[str, int] = {}
        self._acks: dict[int, tuple[threading.Event, list]] = {}
        # PUBACKs that arrived before their publish registered a waiter (or of publish_nowait), by mid, bounded
        self._early: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._refused: str | None = None
        self._closing = False
        self._client = self._make_client(will)

    def _make_client(self, will: tuple[str, bytes] | None) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if self.settings.username:
            client.username_pw_set(self.settings.username, self.settings.password)
        if self.settings.tls:
            client.tls_set(
                ca_certs=self.settings.ca_file,
                certfile=self.settings.cert_file,
                keyfile=self.settings.key_file,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        jitter = random.uniform(0, self.settings.reconnect_min)
        client.reconnect_delay_set(self.settings.reconnect_min + jitter, self.settings.reconnect_max)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_socket_open = _no_delay
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        return client

    # --- lifecycle --------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        """Connect (retrying in the background until `timeout`); raise LinkError if refused."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        self._client.connect_async(
            self.settings.host, self.settings.port, keepalive=self.settings.keepalive,
            clean_start=False, properties=props,
        )
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            detail = self._refused or "no answer"
            raise LinkError(f"could not connect to {self.settings.host}:{self.settings.port}: {detail}")

    def close(self) -> None:
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic] = qos
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic, None)
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    # --- publishing -------------------------------------------------------------------------

    def check_size(self, topic: str, payload: bytes) -> None:
        """Refuse locally what the broker would answer with a disconnect (its advertised maximum)."""
        if self.max_packet_size and len(payload) + len(topic) + PACKET_OVERHEAD > self.max_packet_size:
            raise PayloadTooLarge(
                f"payload of {len(payload)} B for {topic} exceeds the broker's maximum packet size "
                f"of {self.max_packet_size} B"
            )

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 30.0,
                tick: Callable[[], None] | None = None) -> int:
        """Publish with QoS 1 and wait for the PUBACK; raise PublishRefused on a failure reason code.

        `tick` runs at least every 0.5 s while waiting (a caller's watchdog).
        """
        self.check_size(topic, payload)
        done = threading.Event()
        box: list = []
        # paho holds its own lock while it calls on_publish, which takes ours: never call into paho holding ours
        # (a PUBACK arriving during this publish would deadlock the two threads); an ack that comes before the
        # waiter is registered waits in `_early`
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is not None:
                box.append(early)
                done.set()
            else:
                self._acks[info.mid] = (done, box)
        end = time.monotonic() + timeout
        while not done.wait(min(0.5, max(0.0, end - time.monotonic()))) and time.monotonic() < end:
            if tick is not None:
                tick()
        if not done.is_set():
            with self._lock:
                self._acks.pop(info.mid, None)
            raise TimeoutError(f"no PUBACK for {topic} within {timeout:.0f} s")
        reason = box[0]
        if reason.is_failure:
            raise PublishRefused(topic, int(reason.value), str(reason))
        return int(reason.value)

    def publish_nowait(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 without waiting (status heartbeats)."""
        self.check_size(topic, payload)
        self._client.publish(topic, payload, qos=1, retain=retain)

    # --- paho callbacks (network thread) -----------------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._refused = str(reason_code)
            log.error("broker refused connection: %s", reason_code)
            if reason_code.value in (134, 135):  # bad credentials / not authorized: retrying cannot help
                client.disconnect()
            return
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None) if properties else None
        with self._lock:
            subscriptions = list(self._subscriptions.items())
        for topic, qos in subscriptions:
            client.subscribe(topic, qos)
        log.info("connected to %s:%s as %s", self.settings.host, self.settings.port, self.client_id)
        self.connected.set()
        if self._on_connect is not None:
            self._on_connect()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self.connected.is_set() and not self._closing:
            log.warning("disconnected from broker: %s; reconnecting", reason_code)
        self.connected.clear()

    def _handle_message(self, client, userdata, message) -> None:  # noqa: ANN001
        try:
            self._on_message(message.topic, bytes(message.payload))
        except Exception:  # a handler bug must not kill the network thread
            log.exception("error while handling a message on %s", message.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        with self._lock:
            waiter = self._acks.pop(mid, None)
            if waiter is None:
                self._early[mid] = reason_code
                while len(self._early) > EARLY_ACKS:
                    self._early.popitem(last=False)
        if waiter:
            waiter[1].append(reason_code)
            waiter[0].set()
