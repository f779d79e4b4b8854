"""A real Mosquitto configured by fedlite.broker_config: authentication, ACL, TLS and persistence."""

from __future__ import annotations

import os
import ssl
import stat
import time
import tomllib
import uuid

import numpy as np
import pytest
from broker_fixtures import RunningBroker, Session, broker_directory, open_client, running_broker

from fedlite import cli
from fedlite.broker_config import acl, certs
from fedlite.broker_config.broker import Broker, BrokerError
from fedlite.broker_config.config import BrokerPaths, init_broker_dir
from fedlite.broker_config.credentials import add_aggregator, enrol_device, enrol_devices, load_credentials
from fedlite.broker_config.limits import DEFAULT_MAX_PACKET_SIZE, largest_packet, packet_limit_for_model
from fedlite.protocol import manifest as mf
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, encode_model, encode_update, encode_weights
from fedlite.protocol.layout import unflatten
from fedlite.protocol.signing import Signer, generate_keypair
from fedlite.protocol.transport import BrokerSettings, Link, PayloadTooLarge

FED = "demo"
NOT_AUTHORIZED = 135
BAD_CREDENTIALS = 134
NO_MESSAGE_WAIT = 0.7
AGGREGATOR_CLIENT_ID = f"fedlite-aggregator-{FED}"  # the id the aggregator service connects with
SMALL_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> RunningBroker:
    """Devices dev-a and dev-b on the TLS listener and a plain loopback device listener; the aggregator."""
    with running_broker(tmp_path_factory.mktemp("fleet"), federation=FED, devices=["dev-a", "dev-b"],
                        device_port=0) as b:
        yield b


@pytest.fixture(scope="module")
def small_packets(tmp_path_factory: pytest.TempPathFactory) -> RunningBroker:
    """A broker whose max_packet_size is SMALL_LIMIT."""
    with running_broker(tmp_path_factory.mktemp("limit"), federation=FED, devices=["dev-a"],
                        max_packet_size=SMALL_LIMIT) as b:
        yield b


@pytest.fixture
def home(tmp_path):
    """A broker directory path the broker can reach (not created yet)."""
    with broker_directory(tmp_path) as path:
        yield path


@pytest.fixture
def sessions():
    """Collects sessions opened by a test and closes them afterwards."""
    opened = []
    yield opened
    for session in opened:
        session.close()


def connect(b: RunningBroker, listener: str, user: str, password: str, **kwargs) -> Session:
    """A client on the `aggregator`, `tls` (devices) or `plain` (devices on loopback) listener."""
    if listener == "aggregator":
        return open_client(b.host, b.port, user, password, **kwargs)
    if listener == "plain":
        return open_client(b.device_host, b.device_port, user, password, **kwargs)
    return open_client(b.tls_host, b.tls_port, user, password, ca_file=b.ca, **kwargs)


def device(b: RunningBroker, sessions: list, name: str, listener: str = "tls", **kwargs) -> Session:
    """A device connected the way devices connect: a device listener, its own username/password."""
    s = connect(b, listener, name, b.credentials[name], **kwargs)
    sessions.append(s)
    assert s.connected, f"{name} was refused: {s.connack}"
    return s


def aggregator(b: RunningBroker, sessions: list, **kwargs):
    s = open_client(b.host, b.port, b.aggregator, b.credentials[b.aggregator], **kwargs)
    sessions.append(s)
    assert s.connected, f"aggregator was refused: {s.connack}"
    return s


def assert_no_message(session, within: float = NO_MESSAGE_WAIT) -> None:
    with pytest.raises(TimeoutError):
        message = session.next_message(within)
        pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["aggregator", "tls", "plain"])
def test_anonymous_connection_is_refused(fleet: RunningBroker, listener: str) -> None:
    s = connect(fleet, listener, None, None, client_id="anon")
    assert not s.connected
    assert s.connack.value in (NOT_AUTHORIZED, BAD_CREDENTIALS), str(s.connack)


@pytest.mark.parametrize(("user", "listener"), [("dev-a", "aggregator"), ("aggregator", "tls"),
                                                ("aggregator", "plain")])
def test_each_listener_refuses_the_other_roles_credentials(fleet: RunningBroker, user: str, listener: str) -> None:
    s = connect(fleet, listener, user, fleet.credentials[user])
    assert not s.connected, f"{user} logged in on the {listener} listener"
    assert s.connack.value in (NOT_AUTHORIZED, BAD_CREDENTIALS), str(s.connack)


@pytest.mark.parametrize("user", ["dev-a", "aggregator", "nobody-enrolled"])
def test_wrong_password_is_refused(fleet: RunningBroker, user: str) -> None:
    s = open_client(fleet.tls_host, fleet.tls_port, user, "not-the-password", ca_file=fleet.ca)
    assert not s.connected
    assert s.connack.value in (NOT_AUTHORIZED, BAD_CREDENTIALS), str(s.connack)
    assert str(s.connack) in ("Not authorized", "Bad user name or password")


# --- authorisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        topics.update_topic(FED, "dev-b"),
        topics.status_topic(FED, "dev-b"),
        topics.report_topic(FED, "dev-b"),
        topics.round_topic(FED),
        topics.model_topic(FED, "abc123"),
        topics.weights_topic(FED, 3),
        topics.deploy_topic(FED),
        topics.update_topic("other-fed", "dev-a"),
        "fl/demo/anything-else",
        "$SYS/broker/uptime",
    ],
)
def test_device_cannot_write_topics_it_does_not_own(fleet: RunningBroker, sessions, topic: str) -> None:
    dev_a = device(fleet, sessions, "dev-a")
    assert dev_a.publish(topic, b"forged").value == NOT_AUTHORIZED


def test_own_update_reaches_aggregator_through_shared_subscription(fleet: RunningBroker, sessions) -> None:
    agg = aggregator(fleet, sessions)
    granted = agg.subscribe(topics.all_updates(FED, share_group="aggregators"))
    assert [rc.value for rc in granted] == [1]
    dev_a = device(fleet, sessions, "dev-a")
    payload = uuid.uuid4().bytes * 1000
    assert dev_a.publish(topics.update_topic(FED, "dev-a"), payload).value == 0
    message = agg.next_message()
    assert message.topic == topics.update_topic(FED, "dev-a")
    assert message.payload == payload


def test_device_own_status_and_report_are_accepted(fleet: RunningBroker, sessions) -> None:
    agg = aggregator(fleet, sessions)
    agg.subscribe(topics.all_statuses(FED))
    agg.subscribe(topics.all_reports(FED, share_group="aggregators"))
    dev_b = device(fleet, sessions, "dev-b")
    assert dev_b.publish(topics.status_topic(FED, "dev-b"), b"online").value == 0
    assert dev_b.publish(topics.report_topic(FED, "dev-b"), b"declined").value == 0
    received = {agg.next_message().topic, agg.next_message().topic}
    assert received == {topics.status_topic(FED, "dev-b"), topics.report_topic(FED, "dev-b")}


def test_device_cannot_read_other_devices_updates(fleet: RunningBroker, sessions) -> None:
    agg = aggregator(fleet, sessions)
    agg.subscribe(topics.all_updates(FED))
    snoop = device(fleet, sessions, "dev-b")
    snoop.subscribe(topics.all_updates(FED))
    snoop.subscribe(f"fl/{FED}/#")
    dev_a = device(fleet, sessions, "dev-a")
    assert dev_a.publish(topics.update_topic(FED, "dev-a"), b"secret-update").value == 0
    assert agg.next_message().payload == b"secret-update"  # it was delivered where allowed ...
    assert_no_message(snoop)  # ... and not to the other device


def test_devices_read_what_the_aggregator_writes(fleet: RunningBroker, sessions) -> None:
    agg = aggregator(fleet, sessions)
    round_payload = f"round-{uuid.uuid4()}".encode()
    assert agg.publish(topics.round_topic(FED), round_payload, retain=True).value in (0, 16)
    assert agg.publish(topics.weights_topic(FED, 7), b"w7", retain=True).value in (0, 16)
    dev_a = device(fleet, sessions, "dev-a")
    dev_a.subscribe(topics.round_topic(FED))
    assert dev_a.next_message().payload == round_payload
    dev_a.subscribe(f"fl/{FED}/weights/#")
    assert dev_a.next_message().payload == b"w7"


def test_aggregator_cannot_impersonate_a_device(fleet: RunningBroker, sessions) -> None:
    agg = aggregator(fleet, sessions)
    assert agg.publish(topics.update_topic(FED, "dev-a"), b"forged").value == NOT_AUTHORIZED
    assert agg.publish(topics.round_topic("other-fed"), b"forged").value == NOT_AUTHORIZED


def test_device_enrolled_while_running_can_connect_after_reload(fleet: RunningBroker, sessions) -> None:
    refused = open_client(fleet.tls_host, fleet.tls_port, "dev-late", "pw-late-1", ca_file=fleet.ca)
    assert not refused.connected
    fleet.enrol("dev-late", "pw-late-1")  # enrol_device + SIGHUP, waits for "Reloading config"
    late = device(fleet, sessions, "dev-late")
    assert late.publish(topics.update_topic(FED, "dev-late"), b"x").value in (0, 16)
    assert late.publish(topics.update_topic(FED, "dev-a"), b"x").value == NOT_AUTHORIZED


def test_aggregator_enrolled_while_running_can_connect_after_reload(fleet: RunningBroker, sessions) -> None:
    password = add_aggregator(fleet.directory, "agg-late", FED)
    assert not open_client(fleet.host, fleet.port, "agg-late", password).connected
    fleet.broker.reload()
    late = open_client(fleet.host, fleet.port, "agg-late", password, client_id="fedlite-aggregator-late")
    sessions.append(late)
    assert late.connected, str(late.connack)
    assert late.publish(topics.round_topic(FED), b"late round").value in (0, 16)
    assert not connect(fleet, "tls", "agg-late", password).connected  # still an aggregator only


# --- client ids: a device cannot take over another client's session ----------------------------


def assert_stays_connected(session: Session, within: float = NO_MESSAGE_WAIT) -> None:
    with pytest.raises(TimeoutError):
        reason = session.next_disconnect(within)
        pytest.fail(f"the client was disconnected: {reason}")


@pytest.mark.parametrize("listener", ["tls", "plain"])
def test_device_using_another_devices_client_id_does_not_disconnect_it(fleet: RunningBroker, sessions,
                                                                       listener: str) -> None:
    agg = aggregator(fleet, sessions)
    agg.subscribe(topics.all_updates(FED))
    owner = device(fleet, sessions, "dev-a", listener)
    intruder = device(fleet, sessions, "dev-b", listener, client_id="dev-a")
    assert_stays_connected(owner)
    assert owner.publish(topics.update_topic(FED, "dev-a"), b"still mine").value == 0
    assert agg.next_message().payload == b"still mine"
    # the intruder's session is its own username's: it still may write only dev-b's topics
    assert intruder.publish(topics.update_topic(FED, "dev-a"), b"forged").value == NOT_AUTHORIZED
    assert intruder.publish(topics.update_topic(FED, "dev-b"), b"from dev-b").value == 0
    assert agg.next_message().payload == b"from dev-b"


def test_device_using_the_aggregators_client_id_does_not_disconnect_it(fleet: RunningBroker, sessions) -> None:
    agg = aggregator(fleet, sessions, client_id=AGGREGATOR_CLIENT_ID)
    agg.subscribe(topics.all_updates(FED))
    device(fleet, sessions, "dev-a", "tls", client_id=AGGREGATOR_CLIENT_ID)
    dev_b = device(fleet, sessions, "dev-b", "plain", client_id=AGGREGATOR_CLIENT_ID)
    assert_stays_connected(agg)
    assert dev_b.publish(topics.update_topic(FED, "dev-b"), b"for the aggregator").value == 0
    assert agg.next_message().payload == b"for the aggregator"
    assert agg.publish(topics.round_topic(FED), b"round", retain=True).value in (0, 16)


# --- TLS -------------------------------------------------------------------------------------


def test_tls_client_trusting_another_ca_fails_the_handshake(fleet: RunningBroker, tmp_path) -> None:
    other_ca = certs.make_ca(tmp_path / "other", "some other CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        open_client(fleet.tls_host, fleet.tls_port, "dev-a", "whatever", ca_file=other_ca.cert)


def test_tls_hostname_and_versions(fleet: RunningBroker) -> None:
    import socket

    def handshake(host: str, minimum: ssl.TLSVersion, maximum: ssl.TLSVersion) -> str:
        context = ssl.create_default_context(cafile=str(fleet.ca))
        context.minimum_version, context.maximum_version = minimum, maximum
        raw = socket.create_connection((fleet.tls_host, fleet.tls_port), timeout=5)
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.version()

    assert handshake("localhost", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake("127.0.0.1", ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED) == "TLSv1.3"


# --- persistence -------------------------------------------------------------------------------


def test_restart_keeps_retained_messages_and_persistent_sessions(tmp_path, sessions) -> None:
    with running_broker(tmp_path, federation=FED, devices=["dev-a"]) as b:
        agg = open_client(b.host, b.port, b.aggregator, b.credentials[b.aggregator],
                          clean_start=False, session_expiry=3600)
        agg.subscribe(topics.all_updates(FED, share_group="aggregators"))
        assert agg.publish(topics.round_topic(FED), b"round 1", retain=True).value in (0, 16)
        agg.close()  # offline, session kept: updates now queue for it
        dev_a = device(b, sessions, "dev-a")
        assert dev_a.publish(topics.update_topic(FED, "dev-a"), b"queued update").value == 0
        dev_a.close()

        b.restart()

        dev_a = device(b, sessions, "dev-a")
        dev_a.subscribe(topics.round_topic(FED))
        retained = dev_a.next_message()
        assert (retained.payload, retained.retain) == (b"round 1", True)
        agg = open_client(b.host, b.port, b.aggregator, b.credentials[b.aggregator],
                          clean_start=False, session_expiry=3600)
        sessions.append(agg)
        assert agg.connected
        assert agg.next_message().payload == b"queued update"


# --- maximum packet size -----------------------------------------------------------------------


def test_connack_advertises_the_maximum_packet_size(fleet: RunningBroker, small_packets: RunningBroker,
                                                    sessions) -> None:
    for b, expected in ((fleet, DEFAULT_MAX_PACKET_SIZE), (small_packets, SMALL_LIMIT)):
        assert device(b, sessions, "dev-a").max_packet_size == expected
        assert aggregator(b, sessions).max_packet_size == expected


def test_over_limit_publish_from_a_raw_client_is_not_delivered(small_packets: RunningBroker, sessions) -> None:
    b = small_packets
    agg = aggregator(b, sessions)
    agg.subscribe(topics.all_updates(FED))
    dev = device(b, sessions, "dev-a")
    topic = topics.update_topic(FED, "dev-a")
    assert dev.publish(topic, b"y" * (SMALL_LIMIT - 1024)).value == 0  # just under the limit: delivered
    assert len(agg.next_message().payload) == SMALL_LIMIT - 1024
    dev.client.publish(topic, b"x" * SMALL_LIMIT, qos=1)  # paho itself does not enforce the advertised size
    dev.next_disconnect()  # the broker drops the packet and the client
    dev.close()  # before paho's automatic reconnect re-sends it
    assert_no_message(agg)


def test_link_refuses_an_over_limit_payload_before_sending(small_packets: RunningBroker, sessions) -> None:
    b = small_packets
    agg = aggregator(b, sessions)
    agg.subscribe(topics.all_updates(FED))
    settings = BrokerSettings(host=b.tls_host, port=b.tls_port, username="dev-a", password=b.credentials["dev-a"],
                              tls=True, ca_file=str(b.ca))
    link = Link(settings, "dev-a", lambda topic, payload: None)
    link.connect(timeout=10)
    try:
        assert link.max_packet_size == SMALL_LIMIT
        topic = topics.update_topic(FED, "dev-a")
        with pytest.raises(PayloadTooLarge):
            link.publish(topic, b"x" * SMALL_LIMIT)
        assert_no_message(agg)
        assert link.connected.is_set()
        assert link.publish(topic, b"small") == 0
        assert agg.next_message().payload == b"small"
    finally:
        link.close()


def _signed_frames(manifest: dict, train: bytes, infer: bytes, signer: Signer) -> dict[str, int]:
    """The size of each frame a federation of this model publishes, signed, plus its topic: {kind: bytes}."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, manifest["num_params"], dtype=np.uint32) & 0xBF7FFFFF  # finite, |x| < 2
    values = unflatten(bits.view(np.float32), manifest)  # random mantissas: next to incompressible
    header = Header(kind="", federation=FED, round=12345, model_hash=manifest["model_hash"], client_id="dev-a",
                    num_examples=1000, metrics={"loss": 0.123456789, "accuracy": 0.987654321})
    model_topic = topics.model_topic(FED, manifest["model_hash"])
    deploy_header = Header(kind="model", federation=FED, round=12345, model_hash=manifest["model_hash"],
                           extra={"manifest": manifest, "version": 12345, "sha256": "f" * 64})
    frames = {
        "model": (model_topic, encode_model(train, Header(kind="model", federation=FED, round=0,
                                                          model_hash=manifest["model_hash"],
                                                          extra={"manifest": manifest}))),
        "deployed model": (topics.model_topic(FED, "f" * 64), encode_model(infer, deploy_header)),
        "weights": (topics.weights_topic(FED, 12345), encode_weights(values, header)),
        "update": (topics.update_topic(FED, "dev-a"), encode_update(values, header)),
    }
    return {kind: len(topic) + len(signer.sign(topic, frame)) for kind, (topic, frame) in frames.items()}


def test_packet_limit_bounds_every_frame_of_a_large_model(tmp_path) -> None:
    # a 2 M-parameter layout with incompressible model files and weights: zstd's worst case
    layout = [("dense/kernel", (1000, 2000)), ("dense/bias", (2000,)), ("out/kernel", (2000, 10)), ("out/bias", (10,))]
    weights = mf.weight_entries(layout)
    num_params = sum(w["size"] for w in weights)
    rng = np.random.default_rng(1)
    train, infer = rng.bytes(3_000_000), rng.bytes(900_000)
    manifest = {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "arch": "dense", "options": {},
                "input": {"shape": [1000], "dtype": "float32"}, "classes": 10, "weights": weights,
                "num_params": num_params, "signatures": mf.signature_specs((1000,), 10, num_params),
                "exporter_version": mf.EXPORTER_VERSION,
                "files": {"train": {"path": "train.tflite", "bytes": len(train), "sha256": "0" * 64},
                          "infer_int8": {"path": "infer_int8.tflite", "bytes": len(infer), "sha256": "1" * 64}}}
    manifest["model_hash"] = mf.compute_model_hash(manifest)
    generate_keypair(tmp_path)
    sizes = _signed_frames(manifest, train, infer, Signer.from_file(tmp_path / "aggregator.key"))
    bound = largest_packet(manifest, len(train))
    assert max(sizes.values()) <= bound <= 1.05 * max(sizes.values()), (sizes, bound)
    limit = packet_limit_for_model(manifest, len(train))
    assert bound < limit <= 1.25 * bound + 65 * 1024


def test_broker_init_derives_the_packet_limit_from_a_model_dir(tmp_path, capsys) -> None:
    from fedlite.model_export.convert import export_model

    model = tmp_path / "model"
    manifest = export_model("mlp", (64,), 10, model)
    train, infer = (model / "train.tflite").read_bytes(), (model / "infer_int8.tflite").read_bytes()
    generate_keypair(tmp_path / "keys")
    sizes = _signed_frames(manifest, train, infer, Signer.from_file(tmp_path / "keys" / "aggregator.key"))
    assert max(sizes.values()) <= largest_packet(manifest, len(train))
    limit = packet_limit_for_model(manifest, len(train))
    assert limit == 1024 * 1024  # a small model: the floor
    with broker_directory(tmp_path) as home:
        assert cli.main(["broker", "init", str(home), "--federation", FED, "--port", "0", "--tls-port", "0",
                         "--model-dir", str(model)]) == 0
        assert f"max packet size     {limit} B (from {model})" in capsys.readouterr().out
        assert f"max_packet_size {limit}" in BrokerPaths(home).conf.read_text().splitlines()
        password = enrol_device(home, "dev-a", FED)
        with Broker(home) as b:
            s = open_client(b.tls_host, b.tls_port, "dev-a", password, ca_file=b.ca_file)
            assert s.max_packet_size == limit
            s.close()
        (model / "manifest.json").unlink()
        assert cli.main(["broker", "init", str(home), "--federation", FED, "--model-dir", str(model)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fedlite broker init: error: no model manifest at") and err.count("\n") == 1
        assert cli.main(["broker", "init", str(home), "--federation", FED, "--max-packet-size", "100"]) == 2
        err = capsys.readouterr().err
        assert "invalid maximum packet size 100" in err and err.count("\n") == 1


# --- files, errors, CLI ----------------------------------------------------------------------


def test_acl_grants_nothing_outside_user_blocks() -> None:
    text = acl.render_acl({"device": {"d1": ["f"]}, "aggregator": {"agg": ["f"]}})
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules[0].startswith("user ")
    assert "topic write fl/f/updates/d1" in rules
    assert not any(r.startswith("topic") and "d1" not in r and "write" in r and "readwrite" not in r
                   for r in rules)
    assert "pattern" not in text


def test_credentials_files_are_private_and_complete(fleet: RunningBroker) -> None:
    path = fleet.credentials_file("dev-a")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    values = load_credentials(path)
    assert values["device"] == {"client_id": "dev-a", "federation": FED}
    broker = values["broker"]
    assert (broker["username"], broker["password"]) == ("dev-a", fleet.credentials["dev-a"])
    assert (broker["port"], broker["tls"], broker["ca_file"]) == (fleet.tls_port, True, str(fleet.ca))
    password_file = path.with_suffix(".password")
    assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
    assert password_file.read_text().strip() == fleet.credentials["dev-a"]
    agg = tomllib.loads(fleet.credentials_file("aggregator").read_text())
    assert agg["federation"] == {"name": FED}
    broker = agg["broker"]
    assert (broker["port"], broker["tls"], broker["host"]) == (fleet.port, False, fleet.host)


def _conf_sections(conf: str) -> dict[str, list[str]]:
    """{"global": [...], "listener 1883 127.0.0.1": [...], ...}: the settings of each listener block."""
    sections: dict[str, list[str]] = {"global": []}
    current = "global"
    for line in conf.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("listener "):
            current = line
            sections[current] = []
        elif line:
            sections[current].append(line)
    return sections


def test_conf_is_secure_by_default(home) -> None:
    init_broker_dir(home, federations=["f1", "f2"], port=1883, tls_port=8883, device_port=1884)
    paths = BrokerPaths(home)
    sections = _conf_sections(paths.conf.read_text())
    assert list(sections) == ["global", "listener 1883 127.0.0.1", "listener 8883 127.0.0.1",
                              "listener 1884 127.0.0.1"]
    for required in ("per_listener_settings true", "persistence true", f"max_packet_size {DEFAULT_MAX_PACKET_SIZE}"):
        assert required in sections["global"]
    assert not any(line.startswith(("message_size_limit", "allow_anonymous", "password_file", "acl_file"))
                   for line in sections["global"])
    aggregators = sections["listener 1883 127.0.0.1"]
    assert {"allow_anonymous false", f"password_file {paths.aggregator_password_file}",
            f"acl_file {paths.aggregator_acl_file}"} <= set(aggregators)
    assert not any(line.startswith("use_username_as_clientid") for line in aggregators)
    device_rules = {"allow_anonymous false", "use_username_as_clientid true", f"password_file {paths.password_file}",
                    f"acl_file {paths.acl_file}"}
    tls_rules = {"require_certificate false", "tls_version tlsv1.2"}
    assert device_rules | tls_rules <= set(sections["listener 8883 127.0.0.1"])
    assert device_rules <= set(sections["listener 1884 127.0.0.1"])


def test_each_listener_has_only_its_roles_accounts_and_rules(home) -> None:
    init_broker_dir(home, federations=FED, port=0, tls_port=0)
    add_aggregator(home, "agg", FED)
    enrol_device(home, "dev-1", FED)
    enrol_devices(home, ["dev-2", "dev-3"], FED)
    paths = BrokerPaths(home)

    def users(path) -> set[str]:
        return {line.split(":", 1)[0] for line in path.read_text().splitlines() if line}

    def acl_users(path) -> set[str]:
        return {line.split()[1] for line in path.read_text().splitlines() if line.startswith("user ")}

    assert users(paths.password_file) == acl_users(paths.acl_file) == {"dev-1", "dev-2", "dev-3"}
    assert users(paths.aggregator_password_file) == acl_users(paths.aggregator_acl_file) == {"agg"}


def test_init_moves_aggregator_accounts_out_of_the_devices_password_file(home, sessions) -> None:
    init_broker_dir(home, federations=FED, port=0, tls_port=0)
    agg_password, dev_password = add_aggregator(home, "agg", FED), enrol_device(home, "dev-1", FED)
    paths = BrokerPaths(home)
    # a broker directory from before the listeners had their own files: every account in `passwd`
    paths.password_file.write_text(paths.password_file.read_text() + paths.aggregator_password_file.read_text())
    paths.aggregator_password_file.unlink()
    init_broker_dir(home, federations=FED, port=0, tls_port=0)
    assert "agg:" not in paths.password_file.read_text()
    with Broker(home) as b:
        for user, password, listener_host, listener_port, ca, expected in (
            ("agg", agg_password, b.host, b.port, None, True),
            ("dev-1", dev_password, b.host, b.port, None, False),
            ("dev-1", dev_password, b.tls_host, b.tls_port, b.ca_file, True),
            ("agg", agg_password, b.tls_host, b.tls_port, b.ca_file, False),
        ):
            s = open_client(listener_host, listener_port, user, password, ca_file=ca)
            sessions.append(s)
            assert s.connected == expected, (user, listener_port, str(s.connack))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: init_broker_dir(d / "x", federations="bad fed"), "invalid federation"),
        (lambda d: enrol_device(d, "bad/id", FED), "invalid device name"),
        (lambda d: enrol_device(d, "dev-x", "unknown-fed"), "not served"),
        (lambda d: add_aggregator(d, "dev-y", FED), "already enrolled as device"),
        (lambda d: enrol_device(d, "agg-z", FED), "already enrolled as aggregator"),
        (lambda d: enrol_devices(d, ["dev-ok", "agg-z"], FED), "already enrolled as aggregator"),
        (lambda d: enrol_device(d, AGGREGATOR_CLIENT_ID, FED), "reserved.*aggregator client ids"),
        (lambda d: enrol_devices(d, ["dev-ok", "fedlite-aggregator-x"], FED), "reserved"),
        (lambda d: enrol_device(d / "missing", "dev-x", FED), "not a fedlite broker directory"),
        (lambda d: init_broker_dir(d / "x", federations=FED, max_packet_size=1000), "invalid maximum packet size"),
        (lambda d: init_broker_dir(d / "x", federations=FED, port=1883, device_port=1883), "different ports"),
    ],
)
def test_bad_input_gives_clear_errors(home, call, message: str) -> None:
    init_broker_dir(home, federations=FED, port=0, tls_port=None, device_port=0)
    enrol_device(home, "dev-y", FED)
    add_aggregator(home, "agg-z", FED)
    before = {path: path.read_bytes() for path in (home / "passwd", home / "acl", home / "principals.json")}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(home)
    assert before == {path: path.read_bytes() for path in before}  # nothing was enrolled


def test_devices_need_a_listener(home) -> None:
    init_broker_dir(home, federations=FED, port=0, tls_port=None)
    with pytest.raises(ValueError, match="no listener for devices"):
        enrol_device(home, "dev-1", FED)
    assert acl.load_principals(BrokerPaths(home))["device"] == {}


def test_broker_that_cannot_start_reports_its_log(fleet: RunningBroker, tmp_path) -> None:
    home = fleet.directory.parent / f"broken-{uuid.uuid4().hex[:8]}"
    init_broker_dir(home, federations=FED, port=0, tls_port=None)
    with open(BrokerPaths(home).conf, "a") as conf:
        conf.write("no_such_option 1\n")
    started = time.monotonic()
    with pytest.raises(BrokerError, match="exited with code .* while starting(.|\n)*no_such_option"):
        Broker(home).start()
    assert time.monotonic() - started < 5


def test_cli_init_enrol_aggregator(fleet: RunningBroker, capsys) -> None:
    home = fleet.directory.parent / f"cli-{uuid.uuid4().hex[:8]}"
    assert cli.main(["broker", "init", str(home), "--federation", FED, "--port", "0", "--tls-port", "0"]) == 0
    assert cli.main(["broker", "enrol", str(home), "dev-1", "--federation", FED]) == 0
    out = capsys.readouterr().out
    assert "credentials/dev-1.toml" in out and "no running broker" in out
    assert cli.main(["broker", "aggregator", str(home), "agg", "--federation", FED]) == 0
    assert cli.main(["broker", "certs", str(home), "--client", "dev-1"]) == 0
    assert (home / "certs" / "clients" / "dev-1.crt").exists()
    assert cli.main(["broker", "enrol", str(home), "dev 1", "--federation", FED]) == 2
    assert "invalid device name 'dev 1'" in capsys.readouterr().err
    for name in ("agg", AGGREGATOR_CLIENT_ID):
        assert cli.main(["broker", "enrol", str(home), name, "--federation", FED]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fedlite broker enrol: error: {'device id ' if name != 'agg' else ''}'{name}'")
        assert err.count("\n") == 1
    with Broker(home) as broker:
        assert cli.main(["broker", "enrol", str(home), "dev-2", "--federation", FED]) == 0
        assert f"sent SIGHUP to the running broker (pid {broker.pid})" in capsys.readouterr().out
