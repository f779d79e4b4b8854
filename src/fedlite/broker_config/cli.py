"""`fedlite broker`: make a broker directory, enrol devices, aggregators and edge sites, make test certs, run it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlite.broker_config import bridge, broker, certs, config, credentials, limits, permissions


def _add_common(p: argparse.ArgumentParser, name: str | None = None) -> None:
    p.add_argument("dir", type=Path, help="broker directory")
    if name:
        what = name.lower().replace("_", " ")
        p.add_argument("name", metavar=name, help=f"{what} (1-64 of A-Z a-z 0-9 . _ -)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("init", help="create or refresh a broker directory (mosquitto.conf, ACL, test certs)")
    _add_common(p)
    p.add_argument("--federation", action="append", required=True, help="federation served (repeatable)")
    p.add_argument("--port", type=int, default=config.DEFAULT_PORT,
                   help="aggregator listener on loopback (0: a free port)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls-port", type=int, default=config.DEFAULT_TLS_PORT, help="TLS listener for devices")
    tls.add_argument("--no-tls", action="store_true", help="no TLS listener (devices then need --device-port)")
    p.add_argument("--bind", default="127.0.0.1", help="address of the TLS listener (0.0.0.0 for devices)")
    p.add_argument("--device-port", type=int, default=None,
                   help="also a plain listener for devices on loopback (simulated fleets; 0: a free port)")
    p.add_argument("--max-queued-messages", type=int, default=100_000,
                   help="messages the broker queues per offline persistent session before it drops new ones")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-packet-size", type=int, metavar="BYTES", default=None,
                      help=f"largest MQTT packet (default {limits.DEFAULT_MAX_PACKET_SIZE}: a float32 model "
                           "of about 4 M parameters)")
    size.add_argument("--model-dir", type=Path, metavar="DIR", default=None,
                      help="derive the largest MQTT packet from an exported model (manifest.json + train.tflite)")
    p.add_argument("--bridge-to", type=Path, metavar="CREDENTIALS",
                   help="an edge site's broker: bridge it (TLS) to the central broker whose `fedlite broker site` "
                        "wrote this credentials file")
    p.add_argument("--bridge-host", metavar="HOST",
                   help="with --bridge-to: the central broker's address as this site reaches it (default: the one "
                        "in the credentials file)")

    for action, what, help_ in (
        ("enrol", "CLIENT_ID", "add a device to a federation (new password, ACL entries, credentials file)"),
        ("aggregator", "NAME", "add an aggregator user for a federation"),
        ("site", "SITE", "let an edge site's broker bridge into a federation (its credentials file is what the "
                         "site's `fedlite broker init --bridge-to` reads)"),
    ):
        p = sub.add_parser(action, help=help_)
        _add_common(p, what)
        p.add_argument("--federation", required=True, help="the federation it may take part in")
        p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        p.add_argument("--force", action="store_true",
                       help="enrol a name that is already enrolled: a new password (its current credentials stop "
                            "working)")
        if action == "enrol":
            p.add_argument("--bundle", type=Path, metavar="FILE.tar",
                           help="also write a ready-to-copy bundle: agent.toml, ca.crt, aggregator.pub, the password")
            p.add_argument("--aggregator-key", type=Path, metavar="PUB",
                           help="with --bundle: the aggregator's public key (signing key_file with .pub)")
            p.add_argument("--host", help="with --bundle: the broker's address as devices dial it (default: the TLS "
                                          "listener's bind address, or this host's name when it binds all)")

    p = sub.add_parser("revoke", help="remove a device's (or site's, aggregator's) password, ACL entries and "
                                      "credentials, and reload the broker")
    _add_common(p, "NAME")

    p = sub.add_parser("list", help="list the enrolled and revoked devices, sites and aggregators")
    _add_common(p)
    p.add_argument("--fleet", type=Path, metavar="FLEET_JSON",
                   help="the aggregator's state_dir/fleet.json: adds each device's last seen time and state")

    p = sub.add_parser("certs", help="make the test CA and server certificate, or a client certificate")
    _add_common(p)
    p.add_argument("--client", metavar="ID", help="also issue a client certificate for this id")
    p.add_argument("--hostname", action="append", default=[], help="extra server name (repeatable)")
    p.add_argument("--ip", action="append", default=[], help="extra server IP address (repeatable)")
    p.add_argument("--renew", action="store_true", help="re-issue the server certificate")

    p = sub.add_parser("run", help="run mosquitto on the directory in the foreground")
    _add_common(p)


def _init(args: argparse.Namespace) -> int:
    if args.model_dir is not None:
        max_packet_size, source = limits.packet_limit_for_model_dir(args.model_dir), f"from {args.model_dir}"
    elif args.max_packet_size is not None:
        max_packet_size, source = args.max_packet_size, "as given"
    else:
        max_packet_size, source = limits.DEFAULT_MAX_PACKET_SIZE, "default"
    if args.bridge_host and not args.bridge_to:
        raise ValueError("--bridge-host needs --bridge-to")
    bridge_to = bridge.read_credentials(args.bridge_to, args.bridge_host) if args.bridge_to else None
    settings = config.init_broker_dir(
        args.dir,
        federations=args.federation,
        port=args.port,
        tls_port=None if args.no_tls else args.tls_port,
        bind=args.bind,
        max_queued_messages=args.max_queued_messages,
        max_packet_size=max_packet_size,
        device_port=args.device_port,
        bridge_to=bridge_to,
    )
    paths = config.BrokerPaths(args.dir.resolve())
    print(f"broker directory {paths.root} ready for federation(s) {', '.join(settings.federations)}")
    print(f"  aggregator listener {settings.plain_bind}:{settings.port} (plain; aggregator accounts only)")
    if settings.tls_port is not None:
        print(f"  device listener     {settings.bind}:{settings.tls_port} (TLS), CA {paths.ca_cert}")
    if settings.device_port is not None:
        print(f"  device listener     {settings.plain_bind}:{settings.device_port} (plain, loopback)")
    print(f"  max packet size     {settings.max_packet_size} B ({source})")
    if settings.bridge:
        b = settings.bridge
        print(f"  bridge              to {b['host']}:{b['port']} (TLS) as site {b['site']}, conf in {paths.bridges}")
    print(f"next: fedlite broker aggregator {paths.root} NAME --federation F; fedlite broker enrol ...")
    return 0


def _enrol(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    bundle = getattr(args, "bundle", None)
    if bundle is not None:
        from fedlite.broker_config.bundle import check_bundle

        if args.aggregator_key is None:
            raise ValueError("--bundle needs --aggregator-key (the public key devices pin)")
        check_bundle(args.dir, args.aggregator_key)
    add, role = {"enrol": (credentials.enrol_device, "device"),
                 "aggregator": (credentials.add_aggregator, "aggregator"),
                 "site": (credentials.add_site, "site")}[args.action]
    password = add(args.dir, args.name, args.federation, password, force=args.force)
    print(f"enrolled {role} {args.name} in federation {args.federation}")
    print(f"credentials (keep private): {credentials.credentials_path(args.dir, args.name)}")
    if bundle is not None:
        from fedlite.broker_config.bundle import CONFIG_DIR, write_bundle

        write_bundle(args.dir, args.name, args.federation, password, args.aggregator_key, bundle, args.host)
        print(f"bundle (keep private): {bundle}; on the device: tar -xf {bundle.name} -C {CONFIG_DIR}")
    _reload(args.dir, f"it now knows {args.name}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    role, federations = credentials.revoke(args.dir, args.name)
    print(f"revoked {role} {args.name} (federation {', '.join(federations)}): password, ACL entries and "
          "credentials removed")
    _reload(args.dir, f"it refuses {args.name} from now on")
    return 0


def _reload(directory: Path, what: str) -> None:
    pid = broker.reload_running_broker(directory)
    if pid is not None:
        print(f"sent SIGHUP to the running broker (pid {pid}); {what}")
    else:
        print("no running broker for this directory; a broker started elsewhere needs a reload "
              "(kill -HUP its pid, or systemctl reload mosquitto)")


def _list(args: argparse.Namespace) -> int:
    import json
    import time

    from fedlite.broker_config import acl

    paths = config.BrokerPaths(args.dir.resolve())
    config.BrokerSettings.load(paths.root)
    seen: dict[str, dict] = {}
    if args.fleet is not None:
        try:
            seen = {d["client_id"]: d for d in json.loads(args.fleet.read_text())["devices"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{args.fleet} is not an aggregator's fleet.json: {exc}") from None
    rows = [(name, role, ",".join(feds), "enrolled") for role, names in acl.load_principals(paths).items()
            for name, feds in names.items()]
    rows += [(name, str(r["role"]), ",".join(r["federations"]),
              "revoked " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(r["revoked_at"]))))
             for name, r in acl.load_revoked(paths).items()]
    print(f"{'name':<24} {'role':<10} {'federations':<20} {'account':<24} last seen")
    for name, role, feds, account in sorted(rows):
        device = seen.get(name)
        last = "-" if device is None else (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(device["last_seen"]))
                                           + f" ({device['state']}{', stale' if device.get('stale') else ''})")
        print(f"{name:<24} {role:<10} {feds:<20} {account:<24} {last}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    paths = config.BrokerPaths(args.dir.resolve())
    bind = config.BrokerSettings.load(paths.root).bind if paths.settings.exists() else "127.0.0.1"
    hostnames, ips = config.server_names(bind)
    if args.renew or args.hostname or args.ip:
        paths.server_cert.unlink(missing_ok=True)
    ca, server = certs.ensure_test_pki(paths.certs, hostnames + args.hostname, ips + args.ip)
    print(f"CA {ca.cert}\nserver certificate {server.cert}")
    if args.client:
        client = certs.make_client_cert(paths.certs / "clients", ca, args.client)
        print(f"client certificate {client.cert}, key {client.key}")
    if paths.settings.exists():
        permissions.grant_broker_access(paths)
    renewed = args.renew or args.hostname or args.ip
    pid = broker.running_pid(paths.root) if renewed and paths.settings.exists() else None
    if pid is not None:  # Mosquitto reads its listeners' certificates when it starts
        print(f"the running broker (pid {pid}) still serves the old server certificate: restart it "
              "(systemctl restart mosquitto, or stop and start `fedlite broker run`)")
    return 0


def _run(args: argparse.Namespace) -> int:
    broker.exec_broker(args.dir)
    return 0  # not reached


ACTIONS = {"init": _init, "enrol": _enrol, "aggregator": _enrol, "site": _enrol, "revoke": _revoke, "list": _list,
           "certs": _certs, "run": _run}


def run(args: argparse.Namespace) -> int:
    try:
        return ACTIONS[args.action](args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"fedlite broker {args.action}: error: {exc}", file=sys.stderr)
        return 2
