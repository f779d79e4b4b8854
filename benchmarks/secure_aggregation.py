"""Secure aggregation's cost: device bytes and CPU per round, and the aggregator's CPU per round, with and without
SecAgg+, at N devices with 10 % of them dropping out after dealing their shares (the costly case: their masks are
rebuilt from shares).

Both paths are the product's own code, in one process, without a broker: the device's `Participant`, quantization,
masking and packing and the messages as `protocol.messages` serializes them; the aggregator's `SecureRound` (the
stage machine and unmasking, relays signed as the service signs them) against the plain path's `RoundAttempt.offer`
(decode, validate, fold) of the same deltas as int4 updates. Downlink weights are the same in both and counted once:
one int4 delta frame per device (the shipped `[model] downlink_delta`).

    cd benchmarks && ../.venv/bin/python secure_aggregation.py [--devices 10,100,1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import client_ids, layout, random_deltas, round_attempt  # noqa: E402
from benchlib import emit, machine, spread  # noqa: E402

from fedlite.aggregator.secure_round import SecureRound  # noqa: E402
from fedlite.protocol.codec import Header, encode_delta, encode_update  # noqa: E402
from fedlite.protocol.messages import (  # noqa: E402
    RelayMessage,
    SecureMessage,
    from_json,
    split_frame,
    to_json,
)
from fedlite.protocol.secagg import masking, quantize, rotation, wire  # noqa: E402
from fedlite.protocol.secagg.participant import Participant, round_context  # noqa: E402

RUN, SESSION, FED = "5f2b8c0e9a41d7763b0c2e14f9a8d6b1", "bench-session", "bench"
SIGNATURE_BYTES = 76  # the Ed25519 envelope on every relay (protocol §3)


def _signer() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedlite.protocol.signing import Signer

    return Signer(Ed25519PrivateKey.generate())


class Costs:
    """Bytes and CPU seconds per device, and the aggregator's CPU seconds."""

    def __init__(self, ids: list[str]) -> None:
        self.up = dict.fromkeys(ids, 0)
        self.down = dict.fromkeys(ids, 0)
        self.cpu = dict.fromkeys(ids, 0.0)
        self.server = 0.0

    def device(self, client: str, started: float) -> None:
        self.cpu[client] += time.process_time() - started

    def aggregator(self, started: float) -> None:
        self.server += time.process_time() - started


def secure_round(ids: list[str], flats: list[np.ndarray], drop: set[str], levels: int) -> Costs:
    """One SecAgg+ round: every device advertises and deals; those in `drop` send no masked input."""
    params = len(flats[0])
    clip = max(float(np.linalg.norm(f)) for f in flats)
    q = quantize.Quantization(clip, 3.0 * clip / math.sqrt(rotation.block_size(params)), levels, 100, len(ids),
                              SESSION)
    context = round_context(FED, RUN, 1, SESSION)
    server = SecureRound(context, frozenset(ids), q, seed=SESSION, length=q.length(params), parameters=params)
    signer, costs = _signer(), Costs(ids)
    people: dict[str, Participant] = {}

    def send(client: str, message: SecureMessage, body: bytes = b"") -> bytes:
        payload = to_json(message) + (b"\n" + body if body else b"")
        costs.up[client] += len(payload)
        return payload

    def relay(client: str, stage: str, **fields: Any) -> bytes:
        started = time.process_time()
        topic = f"fl/{FED}/relay/{client}"
        signed = signer.sign(topic, to_json(RelayMessage(FED, RUN, 1, SESSION, stage, **fields)))
        costs.aggregator(started)
        costs.down[client] += len(signed)
        return signed[SIGNATURE_BYTES:]

    def received(client: str, payload: bytes) -> SecureMessage:
        started = time.process_time()
        message = from_json(SecureMessage, split_frame(payload)[0])
        costs.aggregator(started)
        return message

    # 1: adverts
    for client in ids:
        started = time.process_time()
        people[client] = Participant(client, context, 0, 0)
        entry = wire.advert_entry(people[client].advert())
        payload = send(client, SecureMessage(client, RUN, 1, SESSION, "advertise", entry.encryption_key,
                                             entry.mask_key, entry.seed_commitment))
        costs.device(client, started)
        m = received(client, payload)
        started = time.process_time()
        server.advert(client, wire.advert_of(wire.AdvertEntry(client, m.encryption_key, m.mask_key,
                                                              m.seed_commitment)))
        costs.aggregator(started)
    started = time.process_time()
    met = server.close_adverts()
    costs.aggregator(started)
    # 2: shares
    for client, (neighbours, points, threshold) in met.items():
        body = from_json(RelayMessage, relay(client, "share", threshold=threshold, points=points,
                                             neighbours=[wire.advert_entry(n) for n in neighbours]))
        started = time.process_time()
        me = people[client]
        me.meet([wire.advert_of(e) for e in body.neighbours], body.points, body.threshold)
        dealt = {c: wire.b64(blob) for c, blob in me.deal().items()}
        payload = send(client, SecureMessage(client, RUN, 1, SESSION, "share", shares=dealt))
        costs.device(client, started)
        m = received(client, payload)
        started = time.process_time()
        server.shares(client, {c: wire.unb64(b, "shares") for c, b in m.shares.items()})
        costs.aggregator(started)
    started = time.process_time()
    held = server.close_shares()
    costs.aggregator(started)
    # 3: masked inputs (the drop-outs train and send nothing)
    rng = np.random.default_rng(0)
    for (client, shares), flat in zip(held.items(), flats, strict=True):
        body = from_json(RelayMessage, relay(client, "masked", shares={d: wire.b64(b) for d, b in shares.items()}))
        started = time.process_time()
        me = people[client]
        for dealer, blob in body.shares.items():
            me.hold(dealer, wire.unb64(blob, "shares"))
        if client in drop:
            costs.device(client, started)
            continue
        values = quantize.encode(flat, 100, q, rng)
        packed = masking.pack(me.masked(values, q.bits, set(me.held)), q.bits)
        payload = send(client, SecureMessage(client, RUN, 1, SESSION, "masked", length=len(values), bits=q.bits),
                       packed)
        costs.device(client, started)
        m = received(client, payload)
        started = time.process_time()
        server.masked(client, masking.unpack(split_frame(payload)[1], m.bits, m.length))
        costs.aggregator(started)
    started = time.process_time()
    asked = server.close_masked()
    costs.aggregator(started)
    # 4: unmasking
    for client, (survivors, dropped) in asked.items():
        body = from_json(RelayMessage, relay(client, "unmask", survivors=sorted(survivors), dropped=sorted(dropped)))
        started = time.process_time()
        revealed = people[client].reveal(set(body.survivors), set(body.dropped))
        payload = send(client, SecureMessage(client, RUN, 1, SESSION, "unmask",
                                             revealed=wire.revealed_entries(revealed)))
        costs.device(client, started)
        m = received(client, payload)
        started = time.process_time()
        server.reveal(client, wire.revealed_of(m.revealed))
        costs.aggregator(started)
    started = time.process_time()
    total, count = server.unmasked()
    quantize.decode_sum(total, q, params)  # as the orchestrator reads it
    costs.aggregator(started)
    return costs


def plain_round(ids: list[str], deltas: list[dict[str, np.ndarray]], specs: Any, drop: set[str]) -> Costs:
    """The same round in the clear: int4 updates encoded by the devices, offered to a real `RoundAttempt`."""
    import dataclasses

    costs, attempt = Costs(ids), round_attempt(specs, ids)
    attempt.context = dataclasses.replace(attempt.context, encoding="int4")
    for client, delta in zip(ids, deltas, strict=True):
        if client in drop:
            continue
        started = time.process_time()
        header = Header(kind="update", federation=attempt.context.federation, round=attempt.context.round,
                        model_hash=attempt.context.model_hash, client_id=client, num_examples=100,
                        run=attempt.context.run)
        payload = encode_update(delta, header, encoding="int4", stochastic=True, rng=np.random.default_rng(0))
        costs.device(client, started)
        costs.up[client] += len(payload)
        started = time.process_time()
        attempt.offer(payload, client)
        costs.aggregator(started)
    started = time.process_time()
    attempt.close()
    costs.aggregator(started)
    return costs


def downlink_bytes(delta: dict[str, np.ndarray]) -> int:
    header = Header(kind="delta", federation=FED, round=2, model_hash="0" * 64, run=RUN)
    return len(encode_delta(delta, header, encoding="int4", base_round=1))


def measure(n: int, params: int, repeats: int, levels: int) -> dict[str, Any]:
    specs = layout(params)
    ids = client_ids(n)
    deltas = random_deltas(specs, distinct=n, seed=n)
    flats = [np.concatenate([d[name].ravel() for name, _ in specs]).astype(np.float64) for d in deltas]
    drop = set(ids[:: 10][: max(1, n // 10)]) if n >= 10 else set()
    down = downlink_bytes(deltas[0])
    rows: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}
    for _ in range(repeats):  # the two alternate, repeat by repeat
        for name, run in (("plain", lambda: plain_round(ids, deltas, specs, drop)),
                          ("secure", lambda: secure_round(ids, flats, drop, levels))):
            wall = time.perf_counter()
            costs = run()
            wall = time.perf_counter() - wall
            sent = [c for c in ids if c not in drop]
            rows[name].append({
                "device_bytes_up": statistics.mean(costs.up[c] for c in sent),
                "device_bytes_down": down + statistics.mean(costs.down[c] for c in sent),
                "device_cpu_ms": 1000 * statistics.mean(costs.cpu[c] for c in sent),
                "aggregator_cpu_s": costs.server, "wall_s": wall,
            })
    out: dict[str, Any] = {"devices": n, "params": sum(int(np.prod(s)) for _, s in specs), "levels": levels,
                           "dropped": len(drop)}
    for name, values in rows.items():
        out[name] = {key: spread([v[key] for v in values]) for key in values[0]}
    p, s = out["plain"], out["secure"]
    out["device_bytes_ratio"] = round(_bytes(s) / _bytes(p), 3)
    out["uplink_ratio"] = round(s["device_bytes_up"]["median"] / p["device_bytes_up"]["median"], 3)
    out["aggregator_cpu_ratio"] = round(s["aggregator_cpu_s"]["median"] / p["aggregator_cpu_s"]["median"], 2)
    return out


def _bytes(row: dict[str, Any]) -> float:
    return row["device_bytes_up"]["median"] + row["device_bytes_down"]["median"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="10,100,1000", help="comma-separated N")
    parser.add_argument("--params", type=int, default=100_000, help="model parameters")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per N (fewer at N >= 1000: at most 2)")
    parser.add_argument("--levels", default="64,16", help="comma-separated quantization levels L to measure")
    args = parser.parse_args(argv)
    results = []
    for n in (int(v) for v in args.devices.split(",")):
        for levels in (int(v) for v in args.levels.split(",")):
            row = measure(n, args.params, args.repeats if n < 1000 else min(2, args.repeats), levels)
            results.append(row)
            s, p = row["secure"], row["plain"]
            print(f"N={n:5d} L={levels:3d}: device bytes {row['device_bytes_ratio']:.2f}x plain "
                  f"(up {s['device_bytes_up']['median'] / 1e3:.1f} vs {p['device_bytes_up']['median'] / 1e3:.1f} kB), "
                  f"device CPU {s['device_cpu_ms']['median']:.1f} vs {p['device_cpu_ms']['median']:.1f} ms, "
                  f"aggregator CPU {s['aggregator_cpu_s']['median']:.2f} vs {p['aggregator_cpu_s']['median']:.2f} s",
                  file=sys.stderr, flush=True)
    emit({"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
