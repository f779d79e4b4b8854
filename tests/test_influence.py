"""One device's influence is bounded by default: a capped example weight and an adaptive norm bound.

The attack from the hardening review: one enrolled device sends well-formed int8 updates with entries of ±990
(under max_abs_value) and num_examples = 10^6 (under max_examples). Before, it was accepted at full weight with a
norm of ~80,000 and the model collapsed (0.87 -> 0.11). Now it is clipped, capped and flagged.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import FED, Tap, announcement, completed, history, initial_model, start_federation
from helpers_models import digits_split

from fedlite.aggregator.config import ServerSection
from fedlite.aggregator.influence import reference_norms, weight_cap
from fedlite.aggregator.rounds import RoundAttempt
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import Rejected, RoundContext
from fedlite.demo.cluster import LocalFederation
from fedlite.protocol import codecs, topics
from fedlite.protocol.codec import Header, Limits, encode_update
from fedlite.protocol.layout import flatten, unflatten, weight_specs
from fedlite.protocol.messages import DeviceStatus, to_json
from fedlite.protocol.selection import is_selected

ATTACK_VALUE, ATTACK_EXAMPLES = 990.0, 1_000_000


def attack_delta(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {w["name"]: (rng.choice([-1.0, 1.0], size=w["shape"]) * ATTACK_VALUE).astype(np.float32)
            for w in manifest["weights"]}


# --- the pure parts ---------------------------------------------------------------------------------------


def test_weight_cap_is_a_multiple_of_the_median_advertised_count():
    assert weight_cap([100, 120, 80, 10**6], 3.0, 10**6) == 330.0  # the liar does not move the median far
    assert weight_cap([], 3.0, 5000) == 5000.0
    assert weight_cap([100, 120], 3.0, 200) == 200.0  # never above max_examples


def test_norm_bound_tracks_recent_complete_rounds():
    history = [{"status": "complete", "update_norms": {"a": 10.0, "b": 12.0}},
               {"status": "abandoned", "update_norms": {"a": 1000.0}},
               {"status": "complete", "update_norms": {"a": 0.4, "b": 0.5, "c": 80_000.0}}]
    reference = reference_norms(history, window=1)
    assert reference == [0.4, 0.5, 80_000.0]
    attempt = RoundAttempt(number=4, session="s", selected=frozenset(), deadline=time.time() + 60, clients_per_round=1,
                           quorum=1, context=RoundContext(federation=FED, round=4, model_hash="h", manifest={},
                                                          selected=frozenset()),
                           limits=Limits(), aggregator=None, norm_reference=reference, norm_multiple=3.0)
    assert attempt.norm_bound == pytest.approx(1.5)  # 3 x median: the outlier does not move it


# --- in process: the same honest updates, with and without the attacker -----------------------------------


def _shards(clients: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    x, y, x_test, y_test = digits_split()
    order = np.argsort(y, kind="stable")  # label-sorted (non-IID), plus a few random examples each
    parts = [np.concatenate([part, np.random.default_rng(i).choice(len(x), 30, replace=False)])
             for i, part in enumerate(np.array_split(order, clients))]
    return [(x[part], y[part]) for part in parts], (x_test, y_test)


def _federate(trainer, manifest: dict, shards, test, rounds: int, attack_from: int | None) -> list[float]:
    """FedAvg rounds through the real codec and RoundAttempt with the default influence bounds."""
    from fedlite.runtime.trainer import local_update

    server, specs = ServerSection(), weight_specs(manifest)
    weights = trainer.get_weights()
    clients = [f"dev-{i}" for i in range(len(shards))]
    selected = clients + (["evil"] if attack_from else [])
    history: list[dict] = []
    accuracy = []
    for number in range(1, rounds + 1):
        context = RoundContext(federation=FED, round=number, model_hash=manifest["model_hash"], manifest=manifest,
                               selected=frozenset(selected), max_examples=server.max_examples)
        advertised = [len(x) for x, _ in shards] + ([ATTACK_EXAMPLES] if attack_from else [])
        attempt = RoundAttempt(number=number, session=f"s{number}", selected=frozenset(selected),
                               deadline=time.time() + 60,
                               clients_per_round=len(selected), quorum=1, context=context, limits=Limits(),
                               aggregator=make_aggregator("mean", specs),
                               max_weight=weight_cap(advertised, server.example_multiple, server.max_examples),
                               norm_reference=reference_norms(history, server.norm_window),
                               norm_multiple=server.norm_multiple, refuse_multiple=server.norm_refuse_multiple,
                               warmup=server.norm_warmup)
        for i, (client, (x, y)) in enumerate(zip(clients, shards, strict=True)):
            delta, _ = local_update(trainer, weights, x, y, 5, 16, 0.2, rng=np.random.default_rng([number, i]))
            header = Header(kind="update", federation=FED, round=number, model_hash=manifest["model_hash"],
                            client_id=client, num_examples=len(x))
            attempt.offer(encode_update(delta, header), client)
            if attack_from and number >= attack_from and i == 1:  # the attacker is not first to arrive
                header = Header(kind="update", federation=FED, round=number, model_hash=manifest["model_hash"],
                                client_id="evil", num_examples=ATTACK_EXAMPLES)
                with pytest.raises(Rejected, match="norm_outlier"):
                    attempt.offer(encode_update(attack_delta(manifest, number), header), "evil")
        outcome = attempt.close()
        history.append(outcome.record.to_dict())
        weights = weights + flatten(outcome.aggregate, manifest)
        trainer.set_weights(weights)
        accuracy.append(trainer.evaluate(*test)[1])
    if attack_from:
        attacked = [r for r in history if r["round"] >= attack_from]
        assert all(r["norm_refused"] == ["evil"] and r["rejected"] == {"norm_outlier": 1} for r in attacked)
    return accuracy


def test_the_attack_leaves_accuracy_within_a_point_of_a_clean_run(tmp_path):
    from fedlite.runtime.trainer import Trainer

    folder = initial_model(tmp_path / "model")
    manifest = __import__("json").loads((folder / "manifest.json").read_text())
    trainer = Trainer((folder / "train.tflite").read_bytes(), manifest)
    initial = trainer.get_weights()
    shards, test = _shards(6)
    clean = _federate(trainer, manifest, shards, test, rounds=8, attack_from=None)
    trainer.set_weights(initial)
    attacked = _federate(trainer, manifest, shards, test, rounds=8, attack_from=3)
    assert clean[-1] > 0.8, clean
    assert attacked[-1] >= clean[-1] - 0.01, (clean, attacked)


def test_an_attacker_held_in_warmup_is_clipped_even_when_it_arrives_first():
    manifest = {"weights": [{"name": "w", "shape": [20, 5]}], "model_hash": "h"}
    specs = weight_specs(manifest)
    context = RoundContext(federation=FED, round=1, model_hash="h", manifest=manifest,
                           selected=frozenset({"evil", "a", "b", "c"}))
    attempt = RoundAttempt(number=1, session="s", selected=context.selected, deadline=time.time() + 60,
                           clients_per_round=4, quorum=1, context=context, limits=Limits(),
                           aggregator=make_aggregator("mean", specs, sum_dtype="float64"), max_weight=300.0,
                           norm_reference=[], norm_multiple=2.0, warmup=3)
    rng = np.random.default_rng(0)
    offers = [("evil", attack_delta(manifest), ATTACK_EXAMPLES)]
    offers += [(c, {"w": rng.normal(0, 0.01, (20, 5)).astype(np.float32)}, 100) for c in "abc"]
    for client, delta, n in offers:
        attempt.offer(encode_update(delta, Header(kind="update", federation=FED, round=1, model_hash="h",
                                                  client_id=client, num_examples=n)), client)
    record = attempt.close().record
    assert record.norm_refused == ["evil"] and record.rejected == {"norm_outlier": 1}
    assert attempt.refused_after_hold == ["evil"] and record.accepted == 3
    mean = unflatten(flatten(attempt.aggregate(), manifest), manifest)["w"]
    assert np.linalg.norm(mean) < record.norm_bound  # bounded by the honest norms, not by ~10^4


# --- real processes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.getbasetemp() / "initial-model")


@pytest.mark.slow
def test_one_attacking_device_cannot_destroy_a_real_run(tmp_path, model):
    agents = [f"dev-{i}" for i in range(4)]
    with LocalFederation(tmp_path / "run", FED, [*agents, "evil"]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 6, "clients_per_round": 4, "over_selection": 0.3,
                                          "deadline_seconds": 30.0,  # all 5 selected, the 4 honest close it
                                          "wait_for_devices_seconds": 1.0})  # 6 wanted, 5 there: go with them
        for agent in agents:  # a round lasts at least 0.7 s of simulated training: the attacker answers each one
            fed.set_device_state(agent, batch_seconds=0.01)
        from broker_fixtures import open_client

        b = fed.broker
        evil = open_client(b.tls_host, b.tls_port, "evil", fed.passwords["evil"], client_id="evil",
                           ca_file=b.ca_file)
        def advertise() -> None:  # claims 10^6 examples, and stays fresh so it is selected every round
            evil.publish(topics.status_topic(FED, "evil"), to_json(DeviceStatus(
                client_id="evil", state="online", eligible=True, num_examples=ATTACK_EXAMPLES,
                updated_at=time.time(), encodings=list(codecs.UPLINK))), retain=True)

        advertise()
        tap = Tap(fed)
        fed.start("aggregator", "aggregator", config)
        manifest = __import__("json").loads((model / "manifest.json").read_text())
        stop = threading.Event()

        def attack() -> None:  # answer every round with the attack, the moment it is announced
            answered: set[str] = set()
            advertised = time.time()
            while not stop.is_set():
                if time.time() - advertised > 5:
                    advertise()
                    advertised = time.time()
                for m in list(tap.seen):
                    if m.kind == "round" and m.payload and m.json()["state"] == "open":
                        a = m.json()
                        if a["session"] in answered or not is_selected(a, "evil"):
                            continue
                        answered.add(a["session"])
                        header = Header(kind="update", federation=FED, round=a["round"], client_id="evil",
                                        model_hash=a["model_hash"], num_examples=ATTACK_EXAMPLES, run=a["run"])
                        evil.publish(topics.update_topic(FED, "evil"),
                                     encode_update(attack_delta(manifest, a["round"]), header,
                                                   encoding=a["plan"]["encoding"]))
                time.sleep(0.05)

        tap.wait(announcement(1), 120, "round 1", fed.processes.values())
        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            tap.wait_until(lambda: completed(fed, 6) is not None, 240, "round 6", fed.processes.values())
        finally:
            stop.set()
        records = [r for r in history(fed) if r["status"] == "complete"]
        assert all(r["norm_refused"] == ["evil"] and r["rejected"].get("norm_outlier") == 1 for r in records)
        assert sum(r["refusals"]["update"]["norm_outlier"] for r in records) == len(records)  # in the ledger
        accuracy = [r["accuracy"] for r in records]
        assert all(np.isfinite(accuracy)) and accuracy[-1] >= 0.8, accuracy
        assert accuracy[-1] >= max(accuracy) - 0.05, accuracy  # no collapse after any attacked round
