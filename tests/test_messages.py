"""Control messages: round trip, and clear refusal of malformed JSON."""

from __future__ import annotations

import pytest

from fedlite.protocol.messages import (
    DeviceReport,
    DeviceStatus,
    MessageError,
    RoundAnnouncement,
    TrainingPlan,
    from_json,
    to_json,
)
from fedlite.protocol.selection import RULE, Selection


def _announcement() -> RoundAnnouncement:
    return RoundAnnouncement(federation="f", round=2, model_hash="h", model_topic="fl/f/model/h",
                             weights_topic="fl/f/weights/2", selection=Selection(RULE, "ab" * 16, 2**63),
                             deadline=12.5,
                             plan=TrainingPlan(epochs=2, learning_rate=0.1))


def test_round_trip_keeps_every_field():
    message = _announcement()
    assert from_json(RoundAnnouncement, to_json(message)) == message
    status = DeviceStatus(client_id="a", state="online", eligible=False, failed_gates={"idle": "cpu 90%"})
    assert from_json(DeviceStatus, to_json(status)) == status


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"type":"round"}', "is missing"),
        (to_json(_announcement()).replace(b'"round":2', b'"round":"2"'), "round must be int"),
        (to_json(_announcement()).replace(b'"epochs":2', b'"epochs":true'), "epochs must be int"),
        (to_json(_announcement()).replace(b'"protocol":2', b'"protocol":7'), "protocol 7"),
        (to_json(DeviceReport(client_id="a", round=1, kind="declined")), "is missing"),
        (b" " * (2 * 1024 * 1024), "exceeds"),
    ],
)
def test_malformed_messages_raise_message_error(payload, match):
    with pytest.raises(MessageError, match=match):
        from_json(RoundAnnouncement, payload)


def test_non_finite_numbers_are_refused():
    with pytest.raises(MessageError):
        from_json(RoundAnnouncement, to_json(_announcement()).replace(b"12.5", b"NaN"))


def test_a_plan_and_a_status_without_encodings_mean_int8_as_before_the_codec_registry():
    import json

    plan = json.loads(to_json(_announcement()))
    del plan["plan"]["encoding"]
    assert from_json(RoundAnnouncement, json.dumps(plan).encode()).plan.encoding == "int8"
    status = json.loads(to_json(DeviceStatus(client_id="a", state="online")))
    del status["encodings"]
    assert from_json(DeviceStatus, json.dumps(status).encode()).encodings == ["int8"]
    with pytest.raises(MessageError, match="encodings must be a list"):
        from_json(DeviceStatus, to_json(DeviceStatus(client_id="a", state="online")).replace(
            b'"encodings":["int8"]', b'"encodings":"int8"'))
