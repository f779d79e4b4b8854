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
