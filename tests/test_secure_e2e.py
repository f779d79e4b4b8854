"""Secure aggregation over a real Mosquitto with real agent processes: rounds that complete on the unmasked sum,
drop-outs by SIGKILL at the key and masked-input stages, and what the broker relays decoding to no device's update."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from broker_fixtures import Session
from federation_helpers import Seen, Tap, announcement, ghost, history, initial_model, start_federation

from fedlite.demo.cluster import LocalFederation, wait_for
from fedlite.protocol import topics
from fedlite.protocol.codec import Header, decode, encode_update
from fedlite.protocol.layout import flatten
from fedlite.protocol.messages import SecureMessage, split_frame, to_json
from fedlite.protocol.secagg import masking, quantize

FED = "faults"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return initial_model(tmp_path_factory.mktemp("model"))


def _complete(fed: LocalFederation) -> list[dict]:
    return [r for r in history(fed) if r["status"] == "complete"]


def test_secure_rounds_complete_and_nothing_the_aggregator_receives_decodes_to_an_update(tmp_path: Path,
                                                                                         model: Path) -> None:
    """Five secure rounds raise accuracy. Everything the broker relays to the aggregator in round 1 is captured: no
    masked input (nor their plain sum) decodes to anything near the round's aggregate step, while the same decoding
    of that step quantized without masks gives it back (the positive control)."""
    agents = [f"dev-{i}" for i in range(1, 6)]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model, rounds={"total": 5},
                                  secure_aggregation={"enabled": True, "stage_seconds": 10.0})
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        wait_for(lambda: aggregator.popen.poll() is not None, 180, "the aggregator to finish",
                 fed.processes.values(), poll=1)
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        done = _complete(fed)
        assert [r["round"] for r in done] == [1, 2, 3, 4, 5], aggregator.log_tail(40)
        assert all(r["secure_aggregation"]["survivors"] == 5 for r in done)
        assert all(not r["client_metrics"] and not r["update_norms"] for r in done)  # nothing per device is kept
        accuracy = [r["accuracy"] for r in done]
        assert accuracy[-1] > accuracy[0] + 0.1, accuracy
        tap.poll(1.0)
        manifest = json.loads((model / "manifest.json").read_text())
        step = _weights(tap, 2, manifest) - _weights(tap, 1, manifest)  # round 1's aggregate, as committed
        opened = tap.wait(announcement(1), 1, "round 1").json()
        plan = quantize.Quantization(**{k: opened["secure"][k] for k in ("clip", "bound", "levels", "max_examples",
                                                                            "participants", "rotation")})
        inputs = [_masked_values(m) for m in tap.seen if m.kind == "secagg" and _stage(m) == ("masked", 1)]
        assert len(inputs) == 5
        decoded = [_cosine(_decode(values, plan, len(step)), step) for values in inputs]
        summed = _cosine(_decode(np.sum(inputs, axis=0) % (1 << plan.bits), plan, len(step)), step)
        assert max(abs(c) for c in [*decoded, summed]) < 0.1, (decoded, summed)
        control = quantize.encode(step, plan.max_examples, plan, np.random.default_rng(0)) % (1 << plan.bits)
        assert _cosine(_decode(control, plan, len(step)), step) > 0.5  # the decoding works on an unmasked input
        tap.close()


def _weights(tap: Tap, number: int, manifest: dict) -> np.ndarray:
    frame = next(m.payload for m in tap.seen if m.topic == topics.weights_topic(FED, number) and m.payload)
    return flatten(decode(frame).tensors, manifest).astype(np.float64)


def _stage(m: Seen) -> tuple[str, int]:
    message = json.loads(split_frame(m.payload)[0])
    return message["stage"], message["round"]


def _masked_values(m: Seen) -> np.ndarray:
    head, body = split_frame(m.payload)
    message = json.loads(head)
    return masking.unpack(body, message["bits"], message["length"]).astype(np.int64)


def _decode(values: np.ndarray, plan: quantize.Quantization, parameters: int) -> np.ndarray:
    """What the aggregator would read from one vector if it were an unmasked sum."""
    summed, _ = quantize.decode_sum(masking.to_signed(values.astype(np.uint64), plan.bits), plan, parameters)
    return summed


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _secure(stage: str, client: str, number: int = 1) -> Callable[[Seen], bool]:
    """Matches `client`'s secure message of `stage` in round `number`."""
    def match(m: Seen) -> bool:
        if m.kind != "secagg" or m.client != client:
            return False
        message = json.loads(split_frame(m.payload)[0])
        return message["stage"] == stage and message["round"] == number
    return match


def _send(session: Session, client: str, message: SecureMessage, body: bytes = b"") -> None:
    session.publish(topics.secagg_topic(FED, client), to_json(message) + (b"\n" + body if body else b""))


def test_drop_outs_at_each_stage_are_unmasked_and_hostile_messages_are_refused(tmp_path: Path, model: Path) -> None:
    """7 selected: dev-7 (a hostile client) never advertises, dev-6 is killed after advertising, dev-5 after dealing
    its shares (while it trains): the round completes on the 4 survivors' sum, dev-5's masks removed."""
    agents = [f"dev-{i}" for i in range(1, 7)]
    with LocalFederation(tmp_path / "run", FED, [*agents, "dev-7"]) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 1, "clients_per_round": 7, "quorum": 3},
                                  secure_aggregation={"enabled": True, "stage_seconds": 4.0})
        fed.set_device_state("dev-5", batch_seconds=0.3)  # trains for seconds: killed in the masked stage
        hostile, tap = ghost(fed, "dev-7"), Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        opened = tap.wait(announcement(1), 60, "round 1", fed.processes.values()).json()
        run, session = opened["run"], opened["session"]
        plan = opened["secure"]
        _send(hostile, "dev-7", SecureMessage("dev-7", run, 1, session, "masked", length=3, bits=plan["bits"]),
              b"\x00" * 8)  # a masked input without keys shared: refused (stage)
        _send(hostile, "dev-7", SecureMessage("dev-7", run, 1, "another", "advertise"))  # another session: late
        _send(hostile, "dev-7", SecureMessage("dev-6", run, 1, session, "advertise"))  # for another device: sender
        manifest = json.loads((model / "manifest.json").read_text())
        zeros = {w["name"]: np.zeros(w["shape"], np.float32) for w in manifest["weights"]}
        header = Header(kind="update", federation=FED, round=1, model_hash=manifest["model_hash"], client_id="dev-7",
                        num_examples=10, run=run)
        hostile.publish(topics.update_topic(FED, "dev-7"), encode_update(zeros, header))  # in the clear: refused
        tap.wait(_secure("advertise", "dev-6"), 30, "dev-6's keys", fed.processes.values())
        fed.kill("dev-6")  # before its shares: the aggregator waits out the stage (dev-7 never advertises either)
        tap.wait(_secure("share", "dev-5"), 30, "dev-5's shares", fed.processes.values())
        fed.kill("dev-5")  # shares dealt, no masked input: its pairwise masks are rebuilt from its neighbours' shares
        wait_for(lambda: aggregator.popen.poll() is not None, 120, "the aggregator to finish", fed.processes.values())
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        (record,) = _complete(fed)
        assert record["accepted"] == 4 and record["secure_aggregation"]["survivors"] == 4, record
        assert record["secure_aggregation"]["dropped"] == 1  # dev-5: dealt shares, sent no input
        assert record["accuracy"] > 0.2, record["accuracy"]  # 10 classes: ~0.1 before
        refused = record["refusals"]["secagg"]
        assert refused.get("stage", 0) >= 1 and refused.get("late", 0) >= 1 and refused.get("sender", 0) >= 1, \
            refused
        assert record["refusals"]["update"] == {"secure_aggregation": 1}, record["refusals"]
        tap.close()
        hostile.close()


def test_a_stage_below_the_threshold_aborts_the_round_and_loses_no_committed_round(tmp_path: Path,
                                                                                     model: Path) -> None:
    """Round 2: two of four devices are killed after dealing their shares; 2 inputs are fewer than threshold + 1:
    the attempt aborts (every device told), round 1 stays committed, and round 2 completes once they are back."""
    agents = [f"dev-{i}" for i in range(1, 5)]
    with LocalFederation(tmp_path / "run", FED, agents) as fed:
        config = start_federation(fed, tmp_path / "data", agents, model,
                                  rounds={"total": 2, "quorum": 2, "wait_for_devices_seconds": 60.0},
                                  secure_aggregation={"enabled": True, "stage_seconds": 4.0})
        for victim in ("dev-3", "dev-4"):
            fed.set_device_state(victim, batch_seconds=0.1)  # a few seconds of training: killed in round 2's
        tap = Tap(fed)
        aggregator = fed.start("aggregator", "aggregator", config)
        for victim in ("dev-3", "dev-4"):
            tap.wait(_secure("share", victim, 2), 60, f"{victim}'s shares in round 2", fed.processes.values())
            fed.kill(victim)
        wait_for(lambda: any(r["status"] == "abandoned" for r in history(fed)), 60, "the aborted attempt",
                 fed.processes.values())
        abandoned = next(r for r in history(fed) if r["status"] == "abandoned")
        assert abandoned["round"] == 2 and "masked inputs arrived" in abandoned["reason"], abandoned
        aborts = [m for m in tap.poll() + tap.seen if m.kind == "relay" and m.payload
                  and json.loads(m.payload)["stage"] == "abort"]
        assert {m.client for m in aborts} >= {"dev-1", "dev-2"}
        for victim in ("dev-3", "dev-4"):
            fed.set_device_state(victim, batch_seconds=0.0)
            fed.start(victim, "agent", fed.run_dir / "agents" / victim / "agent.toml")
        wait_for(lambda: aggregator.popen.poll() is not None, 120, "the aggregator to finish", fed.processes.values())
        assert aggregator.popen.returncode == 0, aggregator.log_tail(40)
        done = _complete(fed)
        assert [r["round"] for r in done] == [1, 2], history(fed)
        assert done[1]["accepted"] == 4
        tap.close()
