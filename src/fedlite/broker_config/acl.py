"""Who may read and write what: the principals registry and the Mosquitto acl_file rendered from it."""

from __future__ import annotations

import json
from typing import Literal

from fedlite.broker_config.config import BrokerPaths
from fedlite.protocol import topics

Role = Literal["device", "aggregator", "site"]
ROLES: tuple[Role, ...] = ("device", "aggregator", "site")
AGGREGATOR_CLIENT_ID_PREFIX = "fedlite-aggregator-"  # the aggregator connects as <prefix><federation>


def _subtree(topic: str) -> str:
    """`fl/f/weights/3` -> `fl/f/weights/#`: everything at the level of the topic's last part."""
    return topic.rsplit("/", 1)[0] + "/#"


def aggregator_owned(federation: str) -> list[str]:
    """Topics only the aggregator writes and every device of the federation reads."""
    return [
        topics.round_topic(federation),
        _subtree(topics.model_topic(federation, "any")),
        _subtree(topics.weights_topic(federation, 0)),
        _subtree(topics.delta_topic(federation, 0)),
        topics.deploy_topic(federation),
    ]


def device_owned(federation: str, client_id: str) -> list[str]:
    """Topics only this device writes."""
    return [
        topics.update_topic(federation, client_id),
        topics.status_topic(federation, client_id),
        topics.report_topic(federation, client_id),
        topics.secagg_topic(federation, client_id),
    ]


def device_rules(federation: str, client_id: str) -> list[str]:
    """ACL lines for a device: read the aggregator's topics and its own relay topic, write only its own."""
    reads = [*aggregator_owned(federation), topics.relay_topic(federation, client_id)]
    return [f"topic read {t}" for t in reads] + [f"topic write {t}" for t in device_owned(federation, client_id)]


def aggregator_rules(federation: str) -> list[str]:
    """ACL lines for an aggregator: write (and read back) its own topics and the aggregators' cluster topics, read
    every device's topics."""
    device_topics = [
        topics.all_updates(federation),
        topics.all_statuses(federation),
        topics.all_reports(federation),
        topics.all_secagg(federation),
    ]
    owned = [*aggregator_owned(federation), topics.cluster_subtree(federation), topics.all_relays(federation)]
    return [f"topic readwrite {t}" for t in owned] + [f"topic read {t}" for t in device_topics]


def site_rules(federation: str, site: str) -> list[str]:
    """ACL lines for an edge site's bridge (see `bridge`): read what the aggregator broadcasts and the cluster's
    brief and grants to this site; write its devices' statuses and reports and the site aggregator's claims,
    partial sums and presence (its devices' updates stay on the site broker)."""
    reads = [*aggregator_owned(federation), topics.cluster_topic(federation, "brief"),
             topics.cluster_topic(federation, "grant", site)]
    writes = [topics.all_statuses(federation), topics.all_reports(federation),
              *(topics.cluster_topic(federation, kind, site) for kind in ("claim", "partial", "member"))]
    return [f"topic read {t}" for t in reads] + [f"topic write {t}" for t in writes]


def load_principals(paths: BrokerPaths) -> dict[str, dict[str, list[str]]]:
    """{"device": {id: [federations]}, "aggregator": {name: [federations]}, "site": {name: [federations]}}."""
    data = json.loads(paths.principals.read_text()) if paths.principals.exists() else {}
    return {role: data.get(role, {}) for role in ROLES}


def load_revoked(paths: BrokerPaths) -> dict[str, dict[str, object]]:
    """{name: {"role", "federations", "revoked_at"}} of every account `revoke` removed (revoked.json)."""
    return json.loads(paths.revoked.read_text()) if paths.revoked.exists() else {}


def record_revoked(paths: BrokerPaths, name: str, role: Role, federations: list[str]) -> None:
    import time

    revoked = load_revoked(paths)
    revoked[name] = {"role": role, "federations": federations, "revoked_at": time.time()}
    paths.revoked.write_text(json.dumps(revoked, indent=2, sort_keys=True) + "\n")


def forget_revoked(paths: BrokerPaths, name: str) -> None:
    """`name` is enrolled again: no longer listed as revoked."""
    revoked = load_revoked(paths)
    if revoked.pop(name, None) is not None:
        paths.revoked.write_text(json.dumps(revoked, indent=2, sort_keys=True) + "\n")


def save_principals(paths: BrokerPaths, principals: dict[str, dict[str, list[str]]]) -> None:
    paths.principals.write_text(json.dumps(principals, indent=2, sort_keys=True) + "\n")


def check_device_id(name: str, principals: dict[str, dict[str, list[str]]]) -> str:
    """`name` if a device may have it: not an aggregator's name, nor an aggregator's client id.

    On device listeners a device's client id is its username, so such a name would let the device
    take over the aggregator's MQTT session.
    """
    if name.startswith(AGGREGATOR_CLIENT_ID_PREFIX):
        raise ValueError(f"device id {name!r} is reserved: ids starting with {AGGREGATOR_CLIENT_ID_PREFIX!r} "
                         "are aggregator client ids")
    for role in ("aggregator", "site"):
        if name in principals[role]:
            raise ValueError(f"{name!r} is already enrolled as {role}; use another name for the device")
    return name


def add_principal(paths: BrokerPaths, role: Role, name: str, federation: str) -> None:
    """Record that `name` takes part in `federation` as `role`; a name has one role only."""
    principals = load_principals(paths)
    if role == "device":
        check_device_id(name, principals)
    for other in ROLES:
        if other != role and name in principals[other]:
            raise ValueError(f"{name!r} is already enrolled as {other}; use another name for the {role}")
    federations = set(principals[role].get(name, []))
    principals[role][name] = sorted(federations | {federation})
    save_principals(paths, principals)


def render_acl(principals: dict[str, dict[str, list[str]]],
               roles: tuple[Role, ...] = ("aggregator", "device", "site")) -> str:
    """The acl_file text for `roles`: one `user` block per principal, nothing granted outside them."""
    lines = [
        "# fedlite ACL, generated from principals.json by fedlite.broker_config; do not edit by hand.",
        "# No rules before the first `user` line: anonymous and unknown clients get nothing.",
    ]
    if "aggregator" in roles:
        for name, federations in sorted(principals.get("aggregator", {}).items()):
            lines += ["", "# aggregator", f"user {name}"]
            lines += [rule for f in federations for rule in aggregator_rules(f)]
    if "device" in roles:
        for name, federations in sorted(principals.get("device", {}).items()):
            lines += ["", "# device", f"user {name}"]
            lines += [rule for f in federations for rule in device_rules(f, name)]
    if "site" in roles:
        for name, federations in sorted(principals.get("site", {}).items()):
            lines += ["", "# edge site (its broker's bridge)", f"user {name}"]
            lines += [rule for f in federations for rule in site_rules(f, name)]
    return "\n".join(lines) + "\n"


def write_acl(paths: BrokerPaths) -> None:
    """The device listeners' ACL (devices, and edge sites' bridges: they log in there over TLS) and the aggregator
    listener's (aggregators only)."""
    principals = load_principals(paths)
    paths.acl_file.write_text(render_acl(principals, ("device", "site")))
    paths.aggregator_acl_file.write_text(render_acl(principals, ("aggregator",)))
