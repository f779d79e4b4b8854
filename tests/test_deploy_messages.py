"""The deploy instruction: strict parsing (nullable targets), and how a device picks its target from it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedlite.agent.deploy import Deployer, DeployError, DeploySection
from fedlite.protocol import topics
from fedlite.protocol.messages import (
    CanaryTarget,
    DeployInstruction,
    DeployTarget,
    MessageError,
    from_json,
    to_json,
)

FED = "fleet"
SHA_A, SHA_B = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()


def _instruction(canary: bool = True) -> DeployInstruction:
    return DeployInstruction(
        federation=FED, deployment_id="d1", issued_at=12.5,
        stable=DeployTarget(version=3, sha256=SHA_A, model_topic=topics.model_topic(FED, SHA_A)),
        canary=CanaryTarget(version=4, sha256=SHA_B, model_topic=topics.model_topic(FED, SHA_B),
                            devices=["dev-1"]) if canary else None,
    )


def test_round_trip_with_and_without_targets():
    for message in (_instruction(), _instruction(canary=False),
                    DeployInstruction(federation=FED, deployment_id="d0", stable=None, canary=None)):
        assert from_json(DeployInstruction, to_json(message)) == message
    raw = json.loads(to_json(_instruction(canary=False)))
    assert raw["type"] == "deploy" and raw["canary"] is None and raw["stable"]["version"] == 3


def _mutated(change) -> bytes:  # noqa: ANN001
    raw = json.loads(to_json(_instruction()))
    change(raw)
    return json.dumps(raw).encode()


@pytest.mark.parametrize(
    "payload, match",
    [
        (_mutated(lambda m: m.pop("stable")), "stable is missing"),  # present, even when null
        (_mutated(lambda m: m.pop("canary")), "canary is missing"),
        (_mutated(lambda m: m.update(stable="v3")), "stable must be a JSON object"),
        (_mutated(lambda m: m["stable"].update(version="3")), "stable.version must be int"),
        (_mutated(lambda m: m["stable"].pop("sha256")), "stable.sha256 is missing"),
        (_mutated(lambda m: m["canary"].update(devices="dev-1")), "canary.devices must be a list"),
        (_mutated(lambda m: m["canary"].update(devices=[1])), r"canary.devices\[\] must be str"),
        (_mutated(lambda m: m.update(type="round")), "expected a 'deploy' message"),
        (_mutated(lambda m: m.update(protocol=1)), "protocol 1"),
        (b"null", "must be a JSON object"),
    ],
)
def test_malformed_instructions_raise_message_error(payload: bytes, match: str):
    with pytest.raises(MessageError, match=match):
        from_json(DeployInstruction, payload)


def _deployer(tmp_path: Path, client_id: str) -> Deployer:
    return Deployer(DeploySection(), tmp_path, client_id, FED)


def test_a_device_takes_the_canary_only_when_listed(tmp_path: Path):
    assert _deployer(tmp_path, "dev-1").target(_instruction()).sha256 == SHA_B
    assert _deployer(tmp_path, "dev-2").target(_instruction()).sha256 == SHA_A
    assert _deployer(tmp_path, "dev-1").target(_instruction(canary=False)).version == 3
    empty = DeployInstruction(federation=FED, deployment_id="d0", stable=None, canary=None)
    assert _deployer(tmp_path, "dev-1").target(empty) is None
    assert _deployer(tmp_path, "dev-1").path == tmp_path / "deploy" / "current.tflite"


def test_a_target_must_name_its_own_model_topic_and_federation(tmp_path: Path):
    elsewhere = _instruction(canary=False)
    elsewhere.stable.model_topic = topics.model_topic(FED, SHA_B)
    with pytest.raises(DeployError, match="bad sha256 or model topic"):
        _deployer(tmp_path, "dev-2").target(elsewhere)
    short = _instruction(canary=False)
    short.stable.sha256 = "abc"
    short.stable.model_topic = topics.model_topic(FED, "abc")
    with pytest.raises(DeployError):
        _deployer(tmp_path, "dev-2").target(short)
    other = _instruction()
    other.federation = "other"
    with pytest.raises(DeployError, match="federation"):
        _deployer(tmp_path, "dev-2").target(other)
