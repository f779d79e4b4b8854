"""Test helpers: a real Mosquitto made by fedlite.broker_config, and MQTT v5 paho-mqtt 2.x clients for it.

Use from a test module (tests/ is on sys.path under pytest):

    from broker_fixtures import open_client, running_broker

    def test_x(tmp_path):
        with running_broker(tmp_path, federation="demo", devices=["dev-a"]) as b:
            agg = open_client(b.host, b.port, "aggregator", b.credentials["aggregator"])
            dev = open_client(b.tls_host, b.tls_port, "dev-a", b.credentials["dev-a"], ca_file=b.ca)

or request the `mqtt_broker` fixture (import it into the module, or into a conftest.py).
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedlite.broker_config import permissions
from fedlite.broker_config.broker import Broker
from fedlite.broker_config.config import init_broker_dir
from fedlite.broker_config.credentials import add_aggregator, credentials_path, enrol_device

DEFAULT_DEVICES = ("dev-a", "dev-b")
AGGREGATOR = "aggregator"
TIMEOUT = 5.0


@dataclass
class RunningBroker:
    """A started broker plus the users enrolled in it; `credentials` maps username -> password."""

    broker: Broker
    federation: str
    aggregator: str
    devices: list[str]
    credentials: dict[str, str] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.broker.paths.root

    @property
    def host(self) -> str:
        """Aggregator listener (plain, loopback): only aggregator accounts can log in."""
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def tls_host(self) -> str:
        return self.broker.tls_host

    @property
    def tls_port(self) -> int | None:
        return self.broker.tls_port

    @property
    def device_host(self) -> str:
        """Plain device listener on loopback (with `running_broker(..., device_port=0)`)."""
        return self.broker.device_host

    @property
    def device_port(self) -> int | None:
        return self.broker.device_port

    @property
    def ca(self) -> Path | None:
        """The test CA certificate to trust for the TLS listener."""
        return self.broker.ca_file

    def credentials_file(self, name: str) -> Path:
        """The TOML credentials file written for device or aggregator `name`."""
        return credentials_path(self.directory, name)

    def enrol(self, client_id: str, password: str | None = None) -> str:
        """Enrol another device while running (reloads the broker); its password."""
        self.credentials[client_id] = enrol_device(self.directory, client_id, self.federation, password)
        self.devices.append(client_id)
        self.broker.reload()
        return self.credentials[client_id]

    def restart(self) -> None:
        self.broker.restart()

    def stop(self) -> None:
        self.broker.stop()


def _reachable(folder: Path, account) -> bool:
    try:
        permissions.check_reachable(folder, account)
    except PermissionError:
        return False
    return True


@contextmanager
def broker_directory(tmp_path: str | os.PathLike) -> Iterator[Path]:
    """A not-yet-existing broker directory mosquitto can reach: `tmp_path/broker` (or broker-N), or,
    when running as root and mosquitto (which drops to its own user) cannot enter tmp_path, a fresh
    folder under the system temp dir (linked from `tmp_path/broker`, deleted afterwards)."""
    tmp_path = Path(tmp_path)
    names = ("broker", *(f"broker-{i}" for i in range(1, 1000)))
    name = next(n for n in names if not (tmp_path / n).exists())
    account = permissions.broker_account()
    if account is None or _reachable(tmp_path, account):
        yield tmp_path / name
        return
    outside = Path(tempfile.mkdtemp(prefix="fedlite-broker-"))
    try:
        outside.chmod(0o755)
        (tmp_path / name).symlink_to(outside, target_is_directory=True)
        yield outside / "broker"
    finally:
        shutil.rmtree(outside, ignore_errors=True)


@contextmanager
def running_broker(
    tmp_path: str | os.PathLike,
    federation: str = "demo",
    devices: Iterable[str] = DEFAULT_DEVICES,
    *,
    aggregator: str = AGGREGATOR,
    tls: bool = True,
    device_port: int | None = None,
    max_packet_size: int | None = None,
) -> Iterator[RunningBroker]:
    """Init a broker directory on free ports, enrol `devices` and `aggregator`, start it; stop it after.

    `device_port=0` adds a plain device listener on loopback; `max_packet_size` overrides the default.
    """
    with broker_directory(tmp_path) as home:
        limit = {} if max_packet_size is None else {"max_packet_size": max_packet_size}
        init_broker_dir(home, federations=federation, port=0, tls_port=0 if tls else None,
                        device_port=device_port, **limit)
        running = RunningBroker(Broker(home), federation, aggregator, list(devices))
        running.credentials[aggregator] = add_aggregator(home, aggregator, federation)
        for device in running.devices:
            running.credentials[device] = enrol_device(home, device, federation)
        with running.broker:
            yield running


@pytest.fixture
def broker_home(tmp_path: Path) -> Iterator[Path]:
    """A broker directory path mosquitto can reach (not created yet), for tests that call init_broker_dir."""
    with broker_directory(tmp_path) as home:
        yield home


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A running broker for federation "demo" with devices dev-a, dev-b and user "aggregator"."""
    with running_broker(tmp_path) as running:
        yield running


class Session:
    """A connected paho-mqtt 2.x MQTT v5 client recording CONNACK, PUBACK/SUBACK reason codes, messages."""

    def __init__(self, client: mqtt.Client):
        self.client = client
        self.connack: ReasonCode | None = None
        self.connack_properties: Properties | None = None
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected = threading.Event()
        self._acks: dict[int, object] = {}
        self._acked = threading.Condition()
        client.on_connect = self._on_connect
        client.on_publish = self._on_ack
        client.on_subscribe = self._on_subscribe
        client.on_message = lambda _c, _u, message: self.messages.put(message)
        client.on_disconnect = lambda _c, _u, _flags, reason_code, _p: self.disconnects.put(reason_code)

    def _on_connect(self, _client, _userdata, _flags, reason_code: ReasonCode, properties) -> None:
        self.connack, self.connack_properties = reason_code, properties
        self._connected.set()

    def _on_ack(self, _client, _userdata, mid: int, reason_code, _properties) -> None:
        with self._acked:
            self._acks[mid] = reason_code
            self._acked.notify_all()

    def _on_subscribe(self, client, userdata, mid: int, reason_codes: list[ReasonCode], properties) -> None:
        self._on_ack(client, userdata, mid, reason_codes, properties)

    def _wait_ack(self, mid: int, what: str, timeout: float):
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, timeout):
                raise TimeoutError(f"no {what} acknowledgement within {timeout} s")
            return self._acks.pop(mid)

    def wait_connack(self, timeout: float = TIMEOUT) -> ReasonCode:
        if not self._connected.wait(timeout):
            raise TimeoutError(f"no CONNACK within {timeout} s")
        return self.connack

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = TIMEOUT
    ) -> ReasonCode:
        """Publish and wait for the PUBACK; its reason code (135 "Not authorized" when the ACL denies it)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish to {topic} failed locally: {mqtt.error_string(info.rc)}")
        return self._wait_ack(info.mid, "PUBACK", timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = TIMEOUT) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; its reason codes."""
        rc, mid = self.client.subscribe(topic, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"subscribe to {topic} failed locally: {mqtt.error_string(rc)}")
        return self._wait_ack(mid, "SUBACK", timeout)

    @property
    def max_packet_size(self) -> int | None:
        """The MaximumPacketSize the broker advertised in CONNACK, if any."""
        return getattr(self.connack_properties, "MaximumPacketSize", None)

    def next_disconnect(self, timeout: float = TIMEOUT) -> ReasonCode:
        """The reason code of the next disconnection; TimeoutError if the client stays connected."""
        try:
            return self.disconnects.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"still connected after {timeout} s") from None

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        """The next message received; TimeoutError if none arrives within `timeout`."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout} s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def open_client(
    host: str,
    port: int,
    username: str | None = None,
    password: str | None = None,
    *,
    client_id: str | None = None,
    ca_file: str | os.PathLike | None = None,
    clean_start: bool = True,
    session_expiry: int | None = None,
    timeout: float = TIMEOUT,
) -> Session:
    """Connect an MQTT v5 client (TLS when `ca_file` is given) and wait for the CONNACK.

    A refused CONNACK does not raise: check `session.connected` / `session.connack` (the client is
    already stopped then). TCP or TLS handshake failures raise from paho's `connect()`.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id if client_id is not None else (username or ""),
        protocol=mqtt.MQTTv5,
    )
    if username is not None:
        client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))
    properties = None
    if session_expiry is not None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
    session = Session(client)
    client.connect(host, port, keepalive=30, clean_start=clean_start, properties=properties)
    client.loop_start()
    try:
        session.wait_connack(timeout)
    finally:
        if not session.connected:
            session.close()
    return session
