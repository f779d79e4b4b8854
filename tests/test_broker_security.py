"""A real Mosquitto configured by fedlite.broker_config: authentication, ACL, TLS and persistence."""

from __future__ import annotations

import os
import ssl
import stat
import time
import tomllib
import uuid

import pytest
from broker_fixtures import RunningBroker, broker_directory, open_client, running_broker

from fedlite import cli
from fedlite.broker_config import acl, certs
from fedlite.broker_config.broker import Broker, BrokerError
from fedlite.broker_config.config import BrokerPaths, init_broker_dir
from fedlite.broker_config.credentials import add_aggregator, enrol_device, load_credentials
from fedlite.protocol import topics

FED = "demo"
NOT_AUTHORIZED = 135
BAD_CREDENTIALS = 134
NO_MESSAGE_WAIT = 0.7


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> RunningBroker:
    with running_broker(tmp_path_factory.mktemp("fleet"), federation=FED, devices=["dev-a", "dev-b"]) as b:
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


def device(b: RunningBroker, sessions: list, name: str):
    """A device connected the way devices connect: TLS listener, its own username/password."""
    s = open_client(b.tls_host, b.tls_port, name, b.credentials[name], ca_file=b.ca)
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


@pytest.mark.parametrize("listener", ["plain", "tls"])
def test_anonymous_connection_is_refused(fleet: RunningBroker, listener: str) -> None:
    if listener == "plain":
        s = open_client(fleet.host, fleet.port, client_id="anon")
    else:
        s = open_client(fleet.tls_host, fleet.tls_port, client_id="anon", ca_file=fleet.ca)
    assert not s.connected
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


def test_conf_is_secure_by_default(home) -> None:
    init_broker_dir(home, federations=["f1", "f2"], port=1883, tls_port=8883)
    lines = [line.split("#")[0].strip() for line in (home / "mosquitto.conf").read_text().splitlines()]
    for required in ("per_listener_settings false", "allow_anonymous false", "persistence true",
                     "require_certificate false", "tls_version tlsv1.2", "listener 1883 127.0.0.1",
                     "listener 8883 127.0.0.1"):
        assert required in lines
    assert not any(line.startswith(("max_packet_size", "message_size_limit")) for line in lines)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: init_broker_dir(d / "x", federations="bad fed"), "invalid federation"),
        (lambda d: enrol_device(d, "bad/id", FED), "invalid device name"),
        (lambda d: enrol_device(d, "dev-x", "unknown-fed"), "not served"),
        (lambda d: add_aggregator(d, "dev-y", FED), "already enrolled as device"),
        (lambda d: enrol_device(d / "missing", "dev-x", FED), "not a fedlite broker directory"),
    ],
)
def test_bad_input_gives_clear_errors(home, call, message: str) -> None:
    init_broker_dir(home, federations=FED, port=0, tls_port=None)
    enrol_device(home, "dev-y", FED)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call(home)


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
    with Broker(home) as broker:
        assert cli.main(["broker", "enrol", str(home), "dev-2", "--federation", FED]) == 0
        assert f"sent SIGHUP to the running broker (pid {broker.pid})" in capsys.readouterr().out
