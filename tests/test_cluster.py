"""Several aggregators on one federation: claims, partial sums over MQTT, exact merging, a dead member, failover."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import Tap, ghost, history, initial_model, start_federation, write_shards

from fedlite.aggregator.attempt_setup import round_context, round_reducer
from fedlite.aggregator.checkpoint import list_checkpoints, load_checkpoint
from fedlite.aggregator.cluster.messages import MessageError, PartialHeader, encode_partial
from fedlite.aggregator.cluster.partials import from_frame, to_frame
from fedlite.aggregator.config import load_config
from fedlite.aggregator.rounds import PartialBook, RoundAttempt
from fedlite.aggregator.strategies import make_aggregator
from fedlite.aggregator.validation import Rejected, RoundContext
from fedlite.broker_config.acl import aggregator_rules, device_rules
from fedlite.demo.cluster import LocalFederation, wait_for
from fedlite.protocol.codec import Header, Limits, encode_update
from fedlite.protocol.layout import unflatten, weight_specs
from fedlite.settings import ConfigError

MANIFEST = {"weights": [{"name": "w", "shape": [8, 4]}, {"name": "b", "shape": [4]}]}
SPECS = [("w", (8, 4)), ("b", (4,))]
CLIENTS = frozenset({"a", "b", "c", "d"})


def _update(client: str, value: float) -> bytes:
    header = Header(kind="update", federation="f", round=1, model_hash="m", client_id=client, num_examples=10)
    delta = {"w": np.full((8, 4), value, np.float32), "b": np.full(4, value, np.float32)}
    return encode_update(delta, header, encoding="int8")


def _attempt(claim: Callable[[str], str] | None = None) -> RoundAttempt:
    return RoundAttempt(number=1, session="s", selected=CLIENTS, deadline=time.time() + 60, clients_per_round=4,
                        quorum=1, context=RoundContext(federation="f", round=1, model_hash="m", manifest=MANIFEST,
                                                       selected=CLIENTS),
                        limits=Limits(), aggregator=make_aggregator("mean", SPECS), claim=claim)


# --- in process -------------------------------------------------------------------------------------


def test_partial_sums_merged_from_members_equal_one_aggregators_mean_and_no_client_counts_twice() -> None:
    single = _attempt()
    for i, client in enumerate(sorted(CLIENTS)):
        single.offer(_update(client, 0.1 * (i + 1)), client)
    expected = single.close().aggregate

    coordinator = _attempt()
    members = {"m2": _attempt(claim=lambda c: coordinator.accept_remote(c, "m2")),
               "m3": _attempt(claim=lambda c: coordinator.accept_remote(c, "m3"))}
    coordinator.offer(_update("a", 0.1), "a")
    members["m2"].offer(_update("b", 0.2), "b")
    members["m3"].offer(_update("c", 0.3), "c")
    members["m3"].offer(_update("d", 0.4), "d")
    with pytest.raises(Rejected, match="another aggregator holds"):  # a re-sent update reaching another member
        members["m2"].offer(_update("d", 0.4), "d")
    with pytest.raises(Rejected, match="duplicate"):  # and the coordinator itself
        coordinator.offer(_update("c", 0.3), "c")
    coordinator.seal()
    for name, member in members.items():  # over the wire, as members send them
        _, partial = from_frame(to_frame(name, 1, "s", member.partial()), coordinator.aggregator)
        assert coordinator.absorb_remote(name, partial) == []
    assert coordinator.drop_unmerged() == {}
    outcome = coordinator.close()
    assert outcome.record.accepted == 4 and outcome.record.aggregators == {"m2": 1, "m3": 2}
    for name in expected:
        np.testing.assert_allclose(outcome.aggregate[name], expected[name], rtol=0, atol=1e-7)


def test_claims_of_a_member_whose_partial_never_arrives_are_dropped_not_counted() -> None:
    coordinator = _attempt()
    member = _attempt(claim=lambda c: coordinator.accept_remote(c, "m2"))
    coordinator.offer(_update("a", 0.1), "a")
    coordinator.offer(_update("b", 0.1), "b")
    member.offer(_update("c", 0.9), "c")
    coordinator.seal()
    assert coordinator.drop_unmerged() == {"m2": ["c"]}
    outcome = coordinator.close()
    assert outcome.record.accepted == 2 and outcome.record.lost == 1
    np.testing.assert_allclose(outcome.aggregate["b"], 0.1, atol=1e-3)  # c's 0.9 is not in it


def test_a_member_hands_over_only_once_the_claims_it_has_out_are_answered_and_admitted() -> None:
    import threading

    coordinator, answer = _attempt(), threading.Event()

    def slow_claim(client: str) -> str:
        granted = coordinator.accept_remote(client, "m2")
        answer.wait(5)  # the grant is on its way while the coordinator asks for the partial sums
        return granted

    member = _attempt(claim=slow_claim)
    offering = threading.Thread(target=member.offer, args=(_update("a", 0.1), "a"))
    offering.start()
    time.sleep(0.2)
    coordinator.seal()
    threading.Timer(0.3, answer.set).start()
    partial = member.partial(claims_timeout=5)
    offering.join(5)
    assert partial.book.clients == ["a"]
    assert coordinator.absorb_remote("m2", partial) == [] and coordinator.drop_unmerged() == {}


def test_a_partial_sum_holding_an_update_its_member_did_not_claim_is_refused_whole() -> None:
    coordinator = _attempt()
    honest = _attempt(claim=lambda c: coordinator.accept_remote(c, "m2"))
    honest.offer(_update("a", 0.1), "a")
    liar = _attempt()  # folds without claiming
    liar.offer(_update("b", 0.5), "b")
    coordinator.seal()
    _, forged = from_frame(to_frame("m3", 1, "s", liar.partial()), coordinator.aggregator)
    assert coordinator.absorb_remote("m3", forged) == ["b"]
    _, partial = from_frame(to_frame("m2", 1, "s", honest.partial()), coordinator.aggregator)
    assert coordinator.absorb_remote("m2", partial) == []
    assert coordinator.close().record.accepted == 1


@pytest.mark.parametrize("arrays, reason", [
    ({"sum/w": np.zeros((8, 4)), "total_weight": np.array(1.0), "count": np.array(1)}, "shape"),
    ({"sum/w": np.full((8, 4), np.nan), "sum/b": np.zeros(4), "total_weight": np.array(1.0),
      "count": np.array(1)}, "nonfinite"),
    ({"sum/w": np.zeros((8, 4)), "sum/b": np.zeros(4), "total_weight": np.array(1.0), "count": np.array(3)},
     "malformed"),
])
def test_a_malformed_partial_sum_is_refused_with_its_reason(arrays: dict, reason: str) -> None:
    frame = encode_partial(PartialHeader(member="m2", round=1, session="s", book=PartialBook(clients=["a"])), arrays)
    with pytest.raises(MessageError) as info:
        from_frame(frame, make_aggregator("mean", SPECS))
    assert info.value.reason == reason
    with pytest.raises(MessageError):
        from_frame(frame[:3], make_aggregator("mean", SPECS))


def test_a_partial_sum_travels_in_float32_no_bigger_than_the_models_weights_frame_needs() -> None:
    specs = [("w", (256, 256)), ("b", (256,))]
    member = RoundAttempt(number=1, session="s", selected=frozenset({"a"}), deadline=time.time() + 60,
                          clients_per_round=1, quorum=1, limits=Limits(), aggregator=make_aggregator("mean", specs),
                          context=RoundContext(federation="f", round=1, model_hash="m", selected=frozenset({"a"}),
                                               manifest={"weights": [{"name": "w", "shape": [256, 256]},
                                                                     {"name": "b", "shape": [256]}]}))
    delta = {"w": np.full((256, 256), 0.01, np.float32), "b": np.full(256, 0.01, np.float32)}
    header = Header(kind="update", federation="f", round=1, model_hash="m", client_id="a", num_examples=10)
    member.offer(encode_update(delta, header, encoding="int8"), "a")
    frame = to_frame("m2", 1, "s", member.partial())
    params = 256 * 256 + 256
    assert 4 * params < len(frame) < 4 * params + 4096  # 4 B per parameter and a small header
    _, partial = from_frame(frame, make_aggregator("mean", specs))
    np.testing.assert_allclose(partial.aggregator.result()["w"], 0.01, rtol=1e-2)


@pytest.mark.parametrize("tables, message", [
    ("[cluster]\nmember = \"a1\"\n", "cluster.member (several aggregators) needs broker.share_group"),
    ("[cluster]\nmember = \"a1\"\n[broker]\nshare_group = \"g\"\n[server]\naggregation = \"median\"\n",
     "needs server.aggregation = \"mean\""),
    ("[cluster]\nmember = \"a b\"\n", "invalid cluster member 'a b'"),
])
def test_cluster_settings_that_cannot_work_are_one_line_config_errors(tmp_path: Path, tables: str,
                                                                     message: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text("[federation]\nname = \"f\"\n[signing]\nkey_file = \"k\"\n" + tables)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_only_aggregators_may_use_the_cluster_topics() -> None:
    assert "topic readwrite fl/f/cluster/#" in aggregator_rules("f")
    assert not any("cluster" in rule for rule in device_rules("f", "dev-1"))


# --- real broker, real processes --------------------------------------------------------------------

AGENTS = [f"dev-{i}" for i in range(1, 7)]
CLUSTER = {"share_group": "aggregators"}


def _start(fed: LocalFederation, tmp_path: Path, model: Path, *devices: str,
           **tables: dict) -> tuple[Path, list, Tap]:
    """Broker, three aggregators (a1 coordinates), a tap, then the agents (and `devices` as ghosts): every member
    follows the first round."""
    shards = write_shards(tmp_path / "data", AGENTS)
    config = start_federation(fed, tmp_path / "data", [], model, broker=CLUSTER, **tables)
    started = fed.start_aggregators(config, 3)
    tap = Tap(fed)
    for device in devices:
        ghost(fed, device)  # selected, never answers: the round stays open until its deadline
    for agent, shard in shards.items():
        fed.start(agent, "agent", fed.agent_config(agent, shard, agent={"status_interval_seconds": 0.5}))
    return config, started, tap


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from fedlite.runtime.trainer import Trainer

    manifest = json.loads((folder / "manifest.json").read_text())
    return unflatten(Trainer((folder / "train.tflite").read_bytes(), manifest).get_weights(), manifest)


def test_three_aggregators_merge_to_the_single_aggregators_aggregate_of_the_same_updates(tmp_path: Path) -> None:
    model = initial_model(tmp_path / "cache")
    with LocalFederation(tmp_path / "run", "faults", AGENTS) as fed:
        config, started, tap = _start(fed, tmp_path, model, server={"norm_multiple": 0.0},  # one bound: none
                                      rounds={"total": 1, "clients_per_round": len(AGENTS),
                                              "deadline_seconds": 60.0})
        wait_for(lambda: started[0].popen.poll() is not None, 180, "the coordinator to finish", started, poll=1)
        assert started[0].popen.returncode == 0, started[0].log_tail(40)
        tap.poll(1.0)
        record = history(fed)[-1]
        assert record["status"] == "complete" and record["accepted"] == len(AGENTS)
        assert sum(record["aggregators"].values()) == len(AGENTS) and len(record["aggregators"]) >= 2, record
        assert any("partial sum of" in p.log.read_text() for p in started[1:])

        cfg = load_config(config)
        manifest = json.loads((model / "manifest.json").read_text())
        announcement = next(s.json() for s in reversed(tap.seen) if s.kind == "round" and s.payload
                            and s.json()["state"] == "open")
        selected = frozenset(AGENTS)
        single = RoundAttempt(number=1, session=record["session"], selected=selected, deadline=time.time() + 60,
                              clients_per_round=len(AGENTS), quorum=1,
                              context=round_context(cfg, manifest, 1, selected, announcement["run"]),
                              limits=Limits(), aggregator=round_reducer(cfg, weight_specs(manifest), 1),
                              max_weight=record["max_weight"])
        updates = {s.client: s.raw for s in tap.seen if s.kind == "updates"}
        assert set(updates) == set(AGENTS)
        for client, payload in updates.items():
            single.offer(payload, client)
        aggregate = single.close().aggregate
        before = _weights(model)
        after = load_checkpoint(list_checkpoints(fed.run_dir / "aggregator" / "checkpoints")[-1][1]).weights
        for name, value in before.items():
            np.testing.assert_allclose(value + aggregate[name], after[name], rtol=0, atol=2e-6)


def test_a_killed_member_loses_only_its_own_updates_and_a_killed_coordinator_is_replaced(tmp_path: Path) -> None:
    model = initial_model(tmp_path / "cache")
    devices = [*AGENTS, "ghost-1"]
    with LocalFederation(tmp_path / "run", "faults", devices) as fed:
        _, started, tap = _start(fed, tmp_path, model, "ghost-1",
                                 rounds={"total": 2, "clients_per_round": len(devices), "quorum": 3,
                                         "deadline_seconds": 15.0},
                                 cluster={"lease_poll_seconds": 0.5})  # a gone member is not waited for
        tap.wait_until(lambda: len({s.client for s in tap.seen if s.kind == "updates"}) == len(AGENTS), 120,
                       "every agent's round-1 update", started)
        time.sleep(1.0)  # claimed and folded by the member that the broker dealt each to
        fed.kill("aggregator-2")  # SIGKILL, mid-round: what it holds is lost with it
        wait_for(lambda: "aggregator a2 left" in started[0].log.read_text(), 30, "its last will", started)
        wait_for(lambda: any(r["round"] == 1 for r in history(fed)), 120, "round 1 to close", started)
        first = history(fed)[0]
        assert first["status"] == "complete", first
        assert first["accepted"] + first["lost"] == len(AGENTS) and first["lost"] >= 1, first
        assert sum(first["aggregators"].values()) == first["accepted"] == len(first["client_metrics"])
        assert "a2" not in first["aggregators"]

        fed.kill("aggregator-1")  # the coordinator: a3 takes the lease and resumes from the checkpoint
        wait_for(lambda: started[2].popen.poll() is not None, 240, "a3 to coordinate the run to its end", started,
                 poll=1)
        assert started[2].popen.returncode == 0, started[2].log_tail(40)
        assert "takes over coordination" in started[2].log.read_text()
        done = [r for r in history(fed) if r["status"] == "complete"]
        assert [r["round"] for r in done] == [1, 2]
        assert done[0]["session"] == first["session"]  # the round completed before the failover is kept



def test_claims_asked_while_a_batch_is_out_go_out_together_in_the_next_one() -> None:
    import threading

    from fedlite.aggregator.cluster.claims import ClaimBatcher

    sent: list[tuple[int, list[str]]] = []
    batcher = ClaimBatcher(lambda batch, clients: sent.append((batch, clients)), timeout=5)
    answers: dict[str, str] = {}
    threads = [threading.Thread(target=lambda c=c: answers.__setitem__(c, batcher.ask(c))) for c in "abcd"]
    threads[0].start()
    time.sleep(0.1)  # a's batch is out
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.1)
    assert sent == [(1, ["a"])]
    batcher.answer(1, {})
    time.sleep(0.1)
    assert sent[1][0] == 2 and sorted(sent[1][1]) == ["b", "c", "d"]  # one message for the three
    batcher.answer(2, {"c": "duplicate"})
    for thread in threads:
        thread.join(5)
    assert answers == {"a": "", "b": "", "c": "duplicate", "d": ""}
    batcher.answer(2, {"b": "late"})  # a repeated answer changes nothing
    with pytest.raises(TimeoutError):
        ClaimBatcher(lambda batch, clients: None, timeout=0.2).ask("e")


def test_a_cluster_message_that_is_unsigned_forged_or_malformed_is_refused_with_its_reason(tmp_path: Path) -> None:
    from fedlite.aggregator.cluster.messages import Claim, read_signed
    from fedlite.protocol.errors import ProtocolError
    from fedlite.protocol.messages import to_json
    from fedlite.protocol.signing import Signer, generate_keypair

    signer = Signer.from_file(generate_keypair(tmp_path / "keys")[0])
    other = Signer.from_file(generate_keypair(tmp_path / "other")[0])
    topic = "fl/f/cluster/claim/m2"
    claim = Claim(member="m2", round=1, session="s", batch=1, clients=["a"])
    assert read_signed(signer.verifier(), Claim, topic, signer.sign(topic, to_json(claim))) == claim
    cases = [(to_json(claim), "unsigned"), (other.sign(topic, to_json(claim)), "unknown_key"),
             (signer.sign("fl/f/cluster/claim/m3", to_json(claim)), "forged"),  # moved to another member's topic
             (signer.sign(topic, b'{"type":"cluster_claim"'), "malformed")]
    for payload, reason in cases:
        with pytest.raises(ProtocolError) as info:
            read_signed(signer.verifier(), Claim, topic, payload)
        assert info.value.reason == reason
