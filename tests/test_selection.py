"""The keyed-hash selection rule: golden vector, exact counts, determinism, and refusal of malformed objects."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlite.aggregator.select import select
from fedlite.protocol import selection
from fedlite.protocol.messages import MessageError, RoundAnnouncement, from_json, to_json
from fedlite.protocol.selection import MAX_THRESHOLD, RULE, Selection, choose, draw, is_selected, nobody

# The golden vector in README.md ("The wire protocol"): a third-party implementation must reproduce it.
GOLDEN_SEED = "000102030405060708090a0b0c0d0e0f"
GOLDEN_THRESHOLD = 12493378733745527094  # 0xad6165c3fd525936: dev-1's draw + 1
GOLDEN = {  # client id -> (draw as 16 hex digits, selected under GOLDEN_THRESHOLD)
    "pi-0001": ("1fa678c7c6d7d8f6", True),
    "pi-0042": ("40128db226e5dadc", True),
    "dev-1": ("ad6165c3fd525935", True),
    "device-07": ("d763d3ad2886a66b", False),
    "capteur-é": ("f82e38041fb336b2", False),  # UTF-8: 63 61 70 74 65 75 72 2d c3 a9
}


def _announcement(sel: Selection) -> RoundAnnouncement:
    return RoundAnnouncement(federation="f", round=1, model_hash="h", model_topic="fl/f/model/h",
                             weights_topic="fl/f/weights/1", selection=sel, deadline=10.0)


def test_golden_vector():
    golden = Selection(RULE, GOLDEN_SEED, GOLDEN_THRESHOLD)
    for client_id, (hex_draw, selected) in GOLDEN.items():
        assert f"{draw(GOLDEN_SEED, client_id):016x}" == hex_draw, client_id
        assert is_selected(golden, client_id) is selected, client_id
    assert not is_selected(Selection(RULE, GOLDEN_SEED, int(GOLDEN["dev-1"][0], 16)), "dev-1")  # strictly below
    chosen, made = choose(GOLDEN, 3, GOLDEN_SEED)
    assert made == golden and chosen == {c for c, (_, s) in GOLDEN.items() if s}


def test_the_rule_is_evaluated_on_every_form_of_an_announcement():
    sel = Selection(RULE, GOLDEN_SEED, GOLDEN_THRESHOLD)
    parsed = json.loads(to_json(_announcement(sel)))
    assert "selected" not in parsed
    for form in (sel, _announcement(sel), parsed, parsed["selection"]):
        assert [c for c in GOLDEN if is_selected(form, c)] == ["pi-0001", "pi-0042", "dev-1"]


@pytest.mark.parametrize("eligible, want", [(1, 1), (10, 3), (100, 100), (1000, 130), (5000, 1)])
def test_exactly_want_eligible_devices_are_selected_and_the_devices_agree(eligible, want):
    ids = [f"dev-{i:05d}" for i in range(eligible)]
    seed = np.random.default_rng(eligible).bytes(16).hex()
    chosen, sel = choose(ids, want, seed)
    assert len(chosen) == want
    assert chosen == {c for c in ids if is_selected(sel, c)}  # what each device decides for itself
    assert max(draw(seed, c) for c in chosen) < sel.threshold <= min(
        (draw(seed, c) for c in ids if c not in chosen), default=MAX_THRESHOLD)


def test_more_wanted_than_eligible_selects_every_eligible_and_none_selects_nobody():
    chosen, sel = choose(["a", "b"], 5, GOLDEN_SEED)
    assert chosen == {"a", "b"} and all(is_selected(sel, c) for c in "ab")
    chosen, sel = choose(["a", "b"], 0, GOLDEN_SEED)
    assert chosen == frozenset() and sel.threshold == 0
    assert choose([], 3, GOLDEN_SEED) == (frozenset(), Selection(RULE, GOLDEN_SEED, 0))
    assert not any(is_selected(nobody(), c) for c in GOLDEN)
    assert all(is_selected(Selection(RULE, GOLDEN_SEED, MAX_THRESHOLD), c) for c in GOLDEN)


def test_devices_outside_the_eligible_set_may_fall_under_the_threshold():
    eligible = [f"dev-{i}" for i in range(50)]
    others = [f"stale-{i}" for i in range(50)]
    chosen, sel = choose(eligible, 10, GOLDEN_SEED)
    under = [c for c in others if is_selected(sel, c)]
    assert under and not set(under) & chosen  # they would train, and their updates are refused as unselected


def test_a_tie_at_the_threshold_selects_every_tied_device(monkeypatch):
    fixed = {"a": 5, "b": 7, "c": 7, "d": 9}
    monkeypatch.setattr(selection, "_draw", lambda key, client_id: fixed[client_id])
    chosen, sel = choose(fixed, 2, GOLDEN_SEED)
    assert chosen == {"a", "b", "c"} and sel.threshold == 8
    assert choose(fixed, 3, GOLDEN_SEED)[0] == {"a", "b", "c"}


def test_selection_is_deterministic_under_the_round_seed_and_differs_between_attempts():
    eligible = [f"dev-{i:03d}" for i in range(200)]
    first = select(eligible, 20, 0.3, np.random.default_rng([0, 4, 1]))
    again = select(list(reversed(eligible)), 20, 0.3, np.random.default_rng([0, 4, 1]))
    retry = select(eligible, 20, 0.3, np.random.default_rng([0, 4, 2]))
    assert first == again and len(first[0]) == 26  # ceil(20 * 1.3)
    assert retry[1].seed != first[1].seed and retry[0] != first[0]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rule", "sha256-32", "rule 'sha256-32' is not one this side implements"),
        ("rule", 7, "rule must be str"),
        ("seed", "00" * 15, "seed must be 32 lowercase hex digits"),
        ("seed", "00" * 17, "seed must be 32 lowercase hex digits"),
        ("seed", "zz" * 16, "seed must be 32 lowercase hex digits"),
        ("seed", "AB" * 16, "seed must be 32 lowercase hex digits"),
        ("seed", " " + "0" * 31, "seed must be 32 lowercase hex digits"),
        ("seed", None, "seed must be str"),
        ("threshold", -1, r"threshold must be an integer in \[0, 2\^64\]"),
        ("threshold", MAX_THRESHOLD + 1, r"threshold must be an integer in \[0, 2\^64\]"),
        ("threshold", 10**400, r"threshold must be an integer in \[0, 2\^64\]"),
        ("threshold", 1.5, "threshold must be int"),
        ("threshold", True, "threshold must be int"),
        ("threshold", "5", "threshold must be int"),
    ],
)
def test_malformed_selection_objects_are_refused(field, value, match):
    fields = json.loads(to_json(_announcement(Selection(RULE, GOLDEN_SEED, 5))))
    fields["selection"][field] = value
    with pytest.raises(MessageError, match=match) as refused:
        from_json(RoundAnnouncement, json.dumps(fields).encode())
    assert refused.value.reason == "malformed" and "RoundAnnouncement.selection" in str(refused.value)


@pytest.mark.parametrize("mutate", [
    lambda f: f.pop("selection"),
    lambda f: f["selection"].pop("seed"),
    lambda f: f.update(selection=[GOLDEN_SEED, 5]),
    lambda f: f.update(selection=None),
])
def test_an_announcement_without_a_well_formed_selection_object_is_refused(mutate):
    fields = json.loads(to_json(_announcement(Selection(RULE, GOLDEN_SEED, 5))))
    mutate(fields)
    with pytest.raises(MessageError):
        from_json(RoundAnnouncement, json.dumps(fields).encode())


def test_bounds_are_accepted_and_the_announcement_does_not_grow_with_the_number_selected():
    for threshold in (0, 1, MAX_THRESHOLD - 1, MAX_THRESHOLD):
        sel = Selection(RULE, GOLDEN_SEED, threshold)
        assert from_json(RoundAnnouncement, to_json(_announcement(sel))).selection == sel
    few = choose([f"dev-{i:05d}" for i in range(10)], 10, GOLDEN_SEED)[1]
    many = choose([f"dev-{i:05d}" for i in range(10_000)], 10_000, GOLDEN_SEED)[1]
    assert abs(len(to_json(_announcement(few))) - len(to_json(_announcement(many)))) <= 2  # digits of the threshold
