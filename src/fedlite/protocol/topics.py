"""MQTT topic layout of a federation; the one place both sides build topic names."""

from __future__ import annotations

import re

ROOT = "fl"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_id(value: str, what: str = "identifier") -> str:
    """Return `value` if it is a valid federation or client id, else raise ValueError."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def round_topic(federation: str) -> str:
    """Retained round announcement, written by the aggregator only."""
    return f"{ROOT}/{federation}/round"


def model_topic(federation: str, model_hash: str) -> str:
    """Retained trainable model (train.tflite) by hash, written by the aggregator only."""
    return f"{ROOT}/{federation}/model/{model_hash}"


def weights_topic(federation: str, round_number: int) -> str:
    """Retained global weights for a round, written by the aggregator only."""
    return f"{ROOT}/{federation}/weights/{round_number}"


def delta_topic(federation: str, round_number: int) -> str:
    """Retained downlink delta from round `round_number` - 1's weights to this round's, written by the aggregator."""
    return f"{ROOT}/{federation}/delta/{round_number}"


def deploy_topic(federation: str) -> str:
    """Retained deployment instruction (inference model rollout), written by the aggregator only."""
    return f"{ROOT}/{federation}/deploy"


def update_topic(federation: str, client_id: str) -> str:
    """A device's model update; only that device may write it."""
    return f"{ROOT}/{federation}/updates/{client_id}"


def status_topic(federation: str, client_id: str) -> str:
    """A device's retained status (online, eligibility, last will); only that device may write it."""
    return f"{ROOT}/{federation}/status/{client_id}"


def report_topic(federation: str, client_id: str) -> str:
    """A device's reports (declines, evaluations); only that device may write it."""
    return f"{ROOT}/{federation}/reports/{client_id}"


def all_updates(federation: str, share_group: str | None = None) -> str:
    """Subscription for every update of a federation; an MQTT v5 shared subscription if a group is given."""
    topic = f"{ROOT}/{federation}/updates/+"
    return f"$share/{share_group}/{topic}" if share_group else topic


def all_statuses(federation: str) -> str:
    return f"{ROOT}/{federation}/status/+"


def all_reports(federation: str, share_group: str | None = None) -> str:
    topic = f"{ROOT}/{federation}/reports/+"
    return f"$share/{share_group}/{topic}" if share_group else topic


def cluster_topic(federation: str, kind: str, member: str = "") -> str:
    """Aggregators' own topics (several aggregators on one federation): `kind` is one of CLUSTER_KINDS; a
    member's claims, grants and partial sums end in its name, the coordinator's brief in nothing."""
    return f"{ROOT}/{federation}/cluster/{kind}" + (f"/{member}" if member else "")


CLUSTER_KINDS = ("brief", "claim", "grant", "partial", "member")


def cluster_subtree(federation: str) -> str:
    """Every aggregator-to-aggregator topic of a federation (ACL'd to aggregators alone)."""
    return f"{ROOT}/{federation}/cluster/#"


def parse_cluster(topic: str) -> tuple[str, str, str] | None:
    """(federation, kind, member or "") of a cluster topic; None if it is not one."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != ROOT or parts[2] != "cluster" or parts[3] not in CLUSTER_KINDS:
        return None
    return parts[1], parts[3], parts[4] if len(parts) == 5 else ""


# The kinds of topic only the aggregator writes, all retained (the third part of their names).
AGGREGATOR_KINDS = ("round", "model", "weights", "delta", "deploy")


def aggregator_retained(federation: str) -> list[str]:
    """Subscriptions to every retained topic the aggregator owns (to see and repair what the broker holds)."""
    return [round_topic(federation), f"{ROOT}/{federation}/model/+", f"{ROOT}/{federation}/weights/+",
            f"{ROOT}/{federation}/delta/+", deploy_topic(federation)]


def client_of(topic: str) -> str:
    """The client id at the end of a per-device topic."""
    return topic.rsplit("/", 1)[-1]


def parse(topic: str) -> tuple[str, str, str] | None:
    """(federation, kind, client or key) of a fedlite topic, e.g. ("wearables", "updates", "pi-1"); None if not one.

    The inverse of the builders above for per-device and keyed topics; the round and deploy topics parse with an
    empty last part.
    """
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == ROOT and parts[2] in ("round", "deploy"):
        return parts[1], parts[2], ""
    if len(parts) != 4 or parts[0] != ROOT or not parts[1] or not parts[3]:
        return None
    return parts[1], parts[2], parts[3]


def secagg_topic(federation: str, client_id: str) -> str:
    """A device's secure-aggregation messages (keys, shares, masked input, revealed shares); only it may write."""
    return f"{ROOT}/{federation}/secagg/{client_id}"


def all_secagg(federation: str) -> str:
    return f"{ROOT}/{federation}/secagg/+"


def relay_topic(federation: str, client_id: str) -> str:
    """The aggregator's signed messages to one device of a secure round; only that device may read it."""
    return f"{ROOT}/{federation}/relay/{client_id}"


def all_relays(federation: str) -> str:
    return f"{ROOT}/{federation}/relay/+"
