"""Golden vectors: fixed bytes for every message kind, checked against the examples in docs/protocol.md.

A third party implementing the protocol from docs/protocol.md can check their encoder and decoder against the
same bytes. Each example in the document sits in a fenced block introduced by ``golden: <name>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedlite.protocol.codec import Header, decode, encode_delta, encode_update, encode_weights
from fedlite.protocol.downlink import digest
from fedlite.protocol.messages import (
    CanaryTarget,
    DeployInstruction,
    DeployTarget,
    DeviceReport,
    DeviceStatus,
    RelayMessage,
    RoundAnnouncement,
    SecureMessage,
    SecurePlan,
    TrainingPlan,
    from_json,
    to_json,
)
from fedlite.protocol.selection import Selection
from fedlite.protocol.signing import Signer, Verifier

SPEC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
RUN = "5f2b8c0e9a41d7763b0c2e14f9a8d6b1"
HASH = "9c1d" * 16
PRIVATE_KEY = bytes(range(1, 33))  # an Ed25519 private key (raw 32 bytes), for the examples only


def _round() -> RoundAnnouncement:
    return RoundAnnouncement(
        federation="wearables", round=3, model_hash=HASH, model_topic=f"fl/wearables/model/{HASH}",
        weights_topic="fl/wearables/weights/3",
        selection=Selection(rule="sha256-64", seed="000102030405060708090a0b0c0d0e0f", threshold=12493378733745527094),
        deadline=1796184000.0, plan=TrainingPlan(epochs=2, batch_size=32, learning_rate=0.05), session="a1b2c3d4e5f6",
        state="open", issued_at=1796183940.0, run=RUN, run_started_at=1796180000.0, epoch=1,
        weights_digest=digest(np.concatenate([DELTA["dense/kernel"].ravel(), DELTA["dense/bias"]])), delta_base=1)


def _closed() -> RoundAnnouncement:
    values = {**_round().__dict__, "state": "closed", "accepted": 8, "reason": "quorum", "issued_at": 1796183990.5}
    return RoundAnnouncement(**values)


def _status() -> DeviceStatus:
    return DeviceStatus(client_id="pi-0042", state="online", eligible=False, failed_gates={"charged": "on battery"},
                        num_examples=480, runtime="ai-edge-litert", agent_version="0.1.0", cached_models=[HASH],
                        deployed_model="", updated_at=1796183941.25, weights_run=RUN, weights_round=2)


def _report() -> DeviceReport:
    return DeviceReport(client_id="pi-0042", round=3, kind="declined", reason="charged: on battery",
                        sent_at=1796183942.0, run=RUN, session="a1b2c3d4e5f6")


def _deploy() -> DeployInstruction:
    return DeployInstruction(
        federation="wearables", deployment_id="d-7",
        stable=DeployTarget(version=12, sha256="ab" * 32, model_topic=f"fl/wearables/model/{'ab' * 32}"),
        canary=CanaryTarget(version=14, sha256="cd" * 32, model_topic=f"fl/wearables/model/{'cd' * 32}",
                            devices=["pi-0042"]),
        issued_at=1796183000.0)


DELTA = {"dense/kernel": np.array([[0.5, -0.25], [0.125, 1.0]], np.float32),
         "dense/bias": np.array([0.01, -0.02], np.float32)}


def _update_header() -> Header:
    return Header(kind="update", federation="wearables", round=3, model_hash=HASH, client_id="pi-0042",
                  num_examples=480, metrics={"train_loss": 0.5, "steps": 30.0}, sent_at=1796183980.0, run=RUN,
                  extra={"bytes_down": 1234})


def _update() -> bytes:
    return encode_update(DELTA, _update_header(), compress=False)


def _weights() -> bytes:
    header = Header(kind="weights", federation="wearables", round=3, model_hash=HASH, sent_at=1796183939.0, run=RUN)
    return encode_weights(DELTA, header, dtype="float16", compress=False)


def _delta_frame() -> bytes:
    header = Header(kind="delta", federation="wearables", round=3, model_hash=HASH, sent_at=1796183939.0, run=RUN)
    return encode_delta(DELTA, header, encoding="int8", base_round=2, compress=False)


SECURE_PLAN = SecurePlan(clip=2.5, bound=0.3125, levels=32, max_examples=480, participants=10, bits=10,
                         rotation="a1b2c3d4e5f6", stage_seconds=15.0)


def _secure_round() -> RoundAnnouncement:
    return RoundAnnouncement(**{**_round().__dict__, "secure": SECURE_PLAN})


def _keys(first: int) -> tuple[bytes, bytes]:
    """Two X25519 key pairs' public keys from fixed private keys (examples only)."""
    from fedlite.protocol.secagg.keys import KeyPair

    return (KeyPair.from_secret(bytes(range(first, first + 32))).public,
            KeyPair.from_secret(bytes(range(first + 32, first + 64))).public)


def _advertise() -> SecureMessage:
    from fedlite.protocol.secagg.participant import commitment, round_context
    from fedlite.protocol.secagg.wire import b64

    c, s = _keys(1)
    context = round_context("wearables", RUN, 3, "a1b2c3d4e5f6")
    return SecureMessage(client_id="pi-0042", run=RUN, round=3, session="a1b2c3d4e5f6", stage="advertise",
                         encryption_key=b64(c), mask_key=b64(s), seed_commitment=b64(commitment(context, bytes(32))))


def _relay_share() -> RelayMessage:
    from fedlite.protocol.messages import AdvertEntry
    from fedlite.protocol.secagg.participant import commitment, round_context
    from fedlite.protocol.secagg.wire import b64

    c, s = _keys(65)
    context = round_context("wearables", RUN, 3, "a1b2c3d4e5f6")
    neighbour = AdvertEntry("pi-0001", b64(c), b64(s), b64(commitment(context, bytes([7] * 32))))
    return RelayMessage(federation="wearables", run=RUN, round=3, session="a1b2c3d4e5f6", stage="share",
                        threshold=2, points={"pi-0001": 1, "pi-0042": 2}, neighbours=[neighbour],
                        issued_at=1796183941.0)


def _secagg_arithmetic() -> bytes:
    """The derivations a third party checks its implementation against (see docs/protocol.md §10)."""
    import json

    from fedlite.protocol.secagg import masking, prg, quantize, rotation
    from fedlite.protocol.secagg.keys import KeyPair, derive

    context = b"fedlite-secagg/wearables/" + RUN.encode() + b"/3/a1b2c3d4e5f6"
    u, v = KeyPair.from_secret(bytes(range(1, 33))), KeyPair.from_secret(bytes(range(65, 97)))
    values = np.array([3, -2, 0, 31, -32], np.int64)
    masked = masking.masked_input(values, 10, bytes(32), {"pi-0001": u.agree(v.public, "mask", context)}, "pi-0042")
    plan = quantize.Quantization(SECURE_PLAN.clip, SECURE_PLAN.bound, 32, 480, 10, "")
    return json.dumps({
        "context": context.decode(),
        "hkdf_mask_seed": u.agree(v.public, "mask", context).hex(),
        "hkdf_shares_key": derive(bytes(32), "shares", context).hex(),
        "prg_seed0_bits10": prg.mask(bytes(32), 6, 10).tolist(),
        "rotation_signs": [int(x) for x in rotation._signs("a1b2c3d4e5f6", 8)],
        "masked_input_bits10": masked.tolist(),
        "packed_bits10": masking.pack(masked, 10).hex(),
        "ring_bits_n10_l32": plan.bits,
    }, separators=(",", ":")).encode()


def _signer() -> Signer:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Signer(Ed25519PrivateKey.from_private_bytes(PRIVATE_KEY))


def _signed_round() -> bytes:
    return _signer().sign("fl/wearables/round", to_json(_round()))


def vectors() -> dict[str, bytes]:
    """Every golden vector by name: JSON messages as UTF-8, frames and envelopes as raw bytes."""
    return {
        "round-open": to_json(_round()), "round-closed": to_json(_closed()), "status": to_json(_status()),
        "report": to_json(_report()), "deploy": to_json(_deploy()), "update-frame": _update(),
        "weights-frame": _weights(), "delta-frame": _delta_frame(), "signed-round": _signed_round(),
        "round-secure": to_json(_secure_round()), "secagg-advertise": to_json(_advertise()),
        "relay-share": to_json(_relay_share()), "secagg-arithmetic": _secagg_arithmetic(),
    }


def _render(name: str, value: bytes) -> str:
    return value.decode() if not name.endswith(("frame", "signed-round")) else _hex(value)


def _hex(value: bytes, width: int = 64) -> str:
    text = value.hex()
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))


def spec_blocks() -> dict[str, str]:
    """The fenced example blocks of docs/protocol.md, by golden name."""
    text = SPEC.read_text(encoding="utf-8")
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"golden: ([\w-]+)\n+```[a-z]*\n(.*?)```", text, re.S)}


@pytest.mark.parametrize("name", list(vectors()))
def test_the_spec_shows_exactly_the_bytes_the_product_writes(name: str) -> None:
    blocks = spec_blocks()
    assert name in blocks, f"docs/protocol.md has no 'golden: {name}' example"
    assert blocks[name] == _render(name, vectors()[name]), f"golden {name} differs from what fedlite writes"


@pytest.mark.parametrize("cls,name", [(RoundAnnouncement, "round-open"), (RoundAnnouncement, "round-closed"),
                                      (DeviceStatus, "status"), (DeviceReport, "report"),
                                      (DeployInstruction, "deploy"), (RoundAnnouncement, "round-secure"),
                                      (SecureMessage, "secagg-advertise"), (RelayMessage, "relay-share")])
def test_the_spec_examples_parse_back_to_the_same_message(cls: type, name: str) -> None:
    text = spec_blocks()[name].encode()
    assert to_json(from_json(cls, text)) == text


def test_the_spec_frames_decode_and_the_signature_verifies() -> None:
    blocks = spec_blocks()
    update = decode(bytes.fromhex(blocks["update-frame"].replace("\n", "")))
    assert update.header.run == RUN and update.header.num_examples == 480
    assert np.allclose(update.tensors["dense/kernel"], DELTA["dense/kernel"], atol=1.0 / 127)
    weights = decode(bytes.fromhex(blocks["weights-frame"].replace("\n", "")))
    assert np.allclose(weights.tensors["dense/bias"], DELTA["dense/bias"], atol=1e-3)
    step = decode(bytes.fromhex(blocks["delta-frame"].replace("\n", "")))
    assert step.header.kind == "delta" and step.header.extra == {"base_round": 2} and step.header.round == 3
    assert np.allclose(step.tensors["dense/kernel"], DELTA["dense/kernel"], atol=1.0 / 127)
    envelope = bytes.fromhex(blocks["signed-round"].replace("\n", ""))
    public = _signer()._key.public_key()
    assert Verifier([public]).verify("fl/wearables/round", envelope) == to_json(_round())
    with pytest.raises(ValueError):
        Verifier([public]).verify("fl/wearables/deploy", envelope)  # the topic is signed too


if __name__ == "__main__":  # print every vector as docs/protocol.md shows it
    for key, raw in vectors().items():
        print(f"golden: {key}\n\n```\n{_render(key, raw)}\n```\n")
