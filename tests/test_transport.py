"""The MQTT link against a real Mosquitto: the advertised maximum packet size is honoured locally."""

from __future__ import annotations

import pytest
from broker_fixtures import broker_directory

from fedlite.broker_config.broker import Broker
from fedlite.broker_config.config import BrokerPaths, init_broker_dir
from fedlite.broker_config.credentials import enrol_devices
from fedlite.protocol import topics
from fedlite.protocol.transport import BrokerSettings, Link, PayloadTooLarge

LIMIT = 20_000


def test_oversized_publish_is_refused_locally_and_the_link_stays_up(tmp_path):
    received: list[bytes] = []
    with broker_directory(tmp_path) as home:
        init_broker_dir(home, federations="f", port=0, tls_port=0)
        password = enrol_devices(home, ["dev-1"], "f")["dev-1"]
        conf = BrokerPaths(home).conf
        conf.write_text(conf.read_text() + f"\nmax_packet_size {LIMIT}\n")
        with Broker(home) as broker:
            settings = BrokerSettings(host=broker.tls_host, port=broker.tls_port, username="dev-1",
                                      password=password, tls=True, ca_file=str(broker.ca_file))
            link = Link(settings, "dev-1", lambda topic, payload: received.append(payload))
            link.connect(timeout=10)
            try:
                assert link.max_packet_size == LIMIT  # read from the CONNACK
                topic = topics.update_topic("f", "dev-1")
                with pytest.raises(PayloadTooLarge, match=f"maximum packet size of {LIMIT} B"):
                    link.publish(topic, b"x" * LIMIT)
                assert link.connected.is_set()  # no disconnect, no resend loop
                assert link.publish(topic, b"x" * 1000) < 128  # a small one still goes through
            finally:
                link.close()


def test_publishes_from_two_threads_never_deadlock_with_their_acks_arriving(tmp_path):
    """paho holds its lock while it calls on_publish; a publish holding the link's lock while calling into paho
    then waited forever for a PUBACK being delivered (an agent hung mid-round this way)."""
    import threading
    import time

    with broker_directory(tmp_path) as home:
        init_broker_dir(home, federations="f", port=0, tls_port=None, device_port=0)
        password = enrol_devices(home, ["dev-1"], "f")["dev-1"]
        with Broker(home) as broker:
            settings = BrokerSettings(host=broker.device_host, port=broker.device_port, username="dev-1",
                                      password=password)
            link = Link(settings, "dev-1", lambda topic, payload: None)
            link.connect(timeout=10)
            status, update = topics.status_topic("f", "dev-1"), topics.update_topic("f", "dev-1")
            done: list[int] = []

            def waiting() -> None:
                for _ in range(1500):
                    link.publish(update, b"u" * 64, timeout=20)
                done.append(1)

            def heartbeats() -> None:
                for _ in range(1500):
                    link.publish_nowait(status, b"s" * 64)
                done.append(2)

            try:
                threads = [threading.Thread(target=f, daemon=True) for f in (waiting, waiting, heartbeats)]
                for thread in threads:
                    thread.start()
                end = time.monotonic() + 60
                for thread in threads:
                    thread.join(max(0.0, end - time.monotonic()))
                assert sorted(done) == [1, 1, 2], "a publish never returned: the link deadlocked"
            finally:
                link.close()
