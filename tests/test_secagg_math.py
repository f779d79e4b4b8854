"""Secure aggregation's arithmetic: shares, keys, masks, the neighbour graph, quantization that sums, unmasking
with drop-outs (in process; the MQTT stages build on these)."""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path

import numpy as np
import pytest

from fedlite.aggregator.secagg import UnmaskError, unmask_sum
from fedlite.protocol.secagg import graph, keys, masking, prg, quantize, shamir
from fedlite.protocol.secagg.participant import Participant, StageError

CONTEXT = b"fed/round-3/session-abc"


def test_any_threshold_of_the_shares_rebuild_the_secret_and_fewer_do_not() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    two = {x: shares[x] for x in (1, 4)}
    with pytest.raises(shamir.ShareError):
        shamir.combine(two, 3)
    # two shares with a forged third interpolate to something else (it is the commitment that catches it)
    forged = two | {5: (int.from_bytes(shares[5], "big") ^ 1).to_bytes(shamir.SHARE_BYTES, "big")}
    assert _or_error(lambda: shamir.combine(forged, 3)) != secret


def _or_error(fn):
    try:
        return fn()
    except shamir.ShareError as exc:
        return exc


def test_agreed_keys_match_per_label_and_a_tampered_or_misaddressed_ciphertext_does_not_open() -> None:
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    assert a.agree(b.public, "shares", CONTEXT) == b.agree(a.public, "shares", CONTEXT)
    assert a.agree(b.public, "shares", CONTEXT) != a.agree(b.public, "mask", CONTEXT)
    assert a.agree(b.public, "mask", CONTEXT) != a.agree(b.public, "mask", CONTEXT + b"x")  # another round
    key = a.agree(b.public, "shares", CONTEXT)
    sealed = keys.seal(key, b"share bytes", b"a->b")
    assert keys.open_sealed(key, sealed, b"a->b") == b"share bytes"
    with pytest.raises(keys.KeyError_):
        keys.open_sealed(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"a->b")
    with pytest.raises(keys.KeyError_):
        keys.open_sealed(key, sealed, b"a->c")
    with pytest.raises(keys.KeyError_):
        a.agree(b"\0" * 32, "mask", CONTEXT)  # a low-order point


def test_masks_are_seeded_uniform_and_packing_round_trips() -> None:
    seed = secrets.token_bytes(32)
    m = prg.mask(seed, 100_000, 20)
    assert np.array_equal(m, prg.mask(seed, 100_000, 20)) and not np.array_equal(m, prg.mask(b"x" * 32, 100_000, 20))
    assert m.max() < 2**20 and abs(m.mean() / 2**19 - 1) < 0.01
    packed = masking.pack(m[:1001], 20)
    assert len(packed) == (1001 * 20 + 7) // 8
    assert np.array_equal(masking.unpack(packed, 20, 1001), m[:1001])
    with pytest.raises(ValueError):
        masking.unpack(packed[:-1], 20, 1001)


def test_the_neighbour_graph_is_symmetric_of_degree_k_and_the_same_for_everyone() -> None:
    clients = [f"d{i}" for i in range(100)]
    k = graph.neighbour_count(100)
    assert k == 20 and graph.neighbour_count(10) == 9 and graph.neighbour_count(1000) == 30
    g = graph.neighbours(clients, "seed-1", k)
    assert g == graph.neighbours(list(reversed(clients)), "seed-1", k)
    assert g != graph.neighbours(clients, "seed-2", k)
    assert all(len(v) == k for v in g.values())
    assert all(a in g[b] for a, vs in g.items() for b in vs)


def test_quantized_updates_sum_without_overflow_and_decode_to_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    plan = quantize.Quantization(clip=1.0, bound=0.05, levels=127, max_examples=100, participants=50)
    plan.check()
    assert plan.bits == 14  # 2 * 50 * 127 + 1 needs 14 bits
    deltas = [rng.normal(0, 0.01, 500) for _ in range(50)]
    examples = [int(n) for n in rng.integers(10, 200, 50)]
    ints = [quantize.encode(d, n, plan, rng) for d, n in zip(deltas, examples, strict=True)]
    assert all(np.abs(q).max() <= plan.levels for q in ints)
    mean, weight = quantize.decode(np.sum(ints, axis=0), plan)
    weights = [min(n, 100) / 100 for n in examples]
    expected = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert weight == pytest.approx(sum(weights), abs=0.5)
    assert np.abs(mean - expected).max() < 0.1 * np.abs(expected).max()  # stochastic rounding, unbiased
    with pytest.raises(ValueError, match="at most 32"):
        quantize.Quantization(1.0, 1.0, 2**20, 1, 10_000).check()


def _round(n: int, threshold: int, seed: str = "round-seed"):
    clients = [f"dev-{i:02d}" for i in range(n)]
    k = graph.neighbour_count(n) if n > 6 else n - 1
    g = graph.neighbours(clients, seed, k)
    ring = graph.ring(clients, seed)
    points = {c: i + 1 for i, c in enumerate(ring)}
    people = {c: Participant(c, CONTEXT, threshold, points[c]) for c in clients}
    adverts = {c: p.advert() for c, p in people.items()}
    return clients, g, points, people, adverts


def _deal(clients, g, points, people, adverts, present):
    for c in present:
        people[c].meet([adverts[v] for v in g[c] if v in present], points)
    for c in present:
        for recipient, sealed in people[c].deal().items():
            people[recipient].hold(c, sealed)


def test_the_unmasked_sum_equals_the_plain_sum_exactly_with_drop_outs_after_masking() -> None:
    rng = np.random.default_rng(1)
    clients, g, points, people, adverts = _round(30, threshold=5)  # 16 neighbours each: SecAgg+, not all pairs
    bits = 16
    _deal(clients, g, points, people, adverts, set(clients))
    values = {c: rng.integers(-100, 101, 300) for c in clients}
    dropped = {"dev-03", "dev-07", "dev-11", "dev-20"}  # dealt their shares, never sent a masked input
    survivors = set(clients) - dropped
    masked = {c: people[c].masked(values[c], bits, alive=set(clients)) for c in survivors}
    for c in survivors:  # a lone masked input says nothing about its values (the positive control is below)
        assert abs(np.corrcoef(masking.to_signed(masked[c], bits), values[c])[0, 1]) < 0.3
    total = np.zeros(300, dtype=np.uint64)
    for y in masked.values():
        total = masking.add(total, y, bits)
    revealed = {c: people[c].reveal(survivors, dropped) for c in survivors}
    result = unmask_sum(total, bits, CONTEXT, 5, adverts, g, survivors, dropped, revealed)
    assert np.array_equal(result, sum(values[c] for c in survivors))  # exactly, in integers


def test_unmasking_fails_cleanly_below_the_threshold_and_on_a_tampered_share() -> None:
    clients, g, points, people, adverts = _round(8, threshold=4)
    _deal(clients, g, points, people, adverts, set(clients))
    bits, survivors, dropped = 12, set(clients[:3]), set(clients[3:])
    total = np.zeros(10, dtype=np.uint64)
    for c in survivors:
        total = masking.add(total, people[c].masked(np.ones(10, dtype=np.int64), bits, set(clients)), bits)
    revealed = {c: people[c].reveal(survivors, dropped) for c in survivors}
    with pytest.raises(UnmaskError, match="needed"):  # 3 revealers, threshold 4
        unmask_sum(total, bits, CONTEXT, 4, adverts, g, survivors, dropped, revealed)

    survivors, dropped = set(clients[:6]), set(clients[6:])
    revealed = {c: people[c].reveal(survivors, dropped) for c in survivors}
    owner = clients[0]
    x, kind, share = revealed[clients[1]][owner]
    revealed[clients[1]] = dict(revealed[clients[1]]) | {owner: (x, kind, bytes(len(share)))}
    keep = {c: revealed[c] for c in clients[1:5]}  # exactly the threshold of dev-00's shares, one of them zeroed
    with pytest.raises(UnmaskError, match="dev-00.*(tampered|belong)"):
        unmask_sum(total, bits, CONTEXT, 4, adverts, g, survivors, dropped, keep)
    with pytest.raises(StageError, match="both shares"):  # a server asking for both masks of one device
        people[clients[1]].reveal({owner}, {owner})


def test_a_share_from_a_device_that_is_not_a_neighbour_or_does_not_open_is_refused() -> None:
    clients, g, points, people, adverts = _round(30, threshold=3)  # 16 neighbours each, of 29
    a = clients[0]
    stranger = next(c for c in clients if c != a and c not in g[a])
    for c in (a, stranger, g[a][0]):
        people[c].meet([adverts[v] for v in g[c]], points)
    with pytest.raises(StageError, match="not a neighbour"):
        people[a].hold(stranger, next(iter(people[stranger].deal().values())))
    neighbour = g[a][0]
    sealed = people[neighbour].deal()[a]
    with pytest.raises(keys.KeyError_):
        people[a].hold(neighbour, sealed[:-1] + bytes([sealed[-1] ^ 1]))


# --- the server's stage machine, with the devices' side (in process) -------------------------------------

def _secure_round(n: int, drop_at: dict[str, set[str]], dim: int = 200, seed: int = 2, forger: str = ""):
    """Run every stage; `drop_at[stage]` are the devices that vanish before sending that stage's message; `forger`
    sends uniform ring elements instead of its masked input. Returns (the round, the devices' deltas, example
    counts, plan)."""
    from fedlite.aggregator.secure_round import SecureRound

    rng = np.random.default_rng(seed)
    clients = [f"dev-{i:03d}" for i in range(n)]
    plan = quantize.Quantization(clip=1.0, bound=0.2, levels=1000, max_examples=50, participants=n)
    server = SecureRound(CONTEXT, frozenset(clients), plan, seed="session-1", length=plan.length(dim))
    people: dict[str, Participant] = {}
    gone: set[str] = set()
    for c in clients:
        if c not in drop_at.get("advertise", set()):
            people[c] = Participant(c, CONTEXT, 0, 0)
            server.advert(c, people[c].advert())
    for c, (adverts, points, threshold) in server.close_adverts().items():
        p = people[c]
        p.threshold, p.point = threshold, points[c]
        p.meet(adverts, points)
    gone |= drop_at.get("share", set())
    for c in sorted(set(people) - gone):
        server.shares(c, people[c].deal())
    for c, sealed in server.close_shares().items():
        for dealer, blob in sealed.items():
            people[c].hold(dealer, blob)
    deltas = {c: rng.normal(0, 0.02, dim) for c in clients}
    examples = {c: int(rng.integers(5, 80)) for c in clients}
    ints = {}
    gone |= drop_at.get("masked", set())
    for c in sorted(server.dealers - gone):
        ints[c] = quantize.encode(deltas[c], examples[c], plan, rng)
        masked = people[c].masked(ints[c], plan.bits, alive=set(people[c].held))
        if c == forger:
            masked = rng.integers(0, 1 << plan.bits, size=masked.shape).astype(np.uint64)
        server.masked(c, masked)
    asked = server.close_masked()
    gone |= drop_at.get("unmask", set())
    for c, (survivors, dropped) in asked.items():
        if c not in gone:
            server.reveal(c, people[c].reveal(survivors, dropped))
    return server, ints, deltas, examples, plan


def test_a_secure_round_unmasks_exactly_the_survivors_quantized_sum_with_drop_outs_at_every_stage() -> None:
    drop = {"advertise": {"dev-000"}, "share": {"dev-001", "dev-002"}, "masked": {"dev-003", "dev-004", "dev-005"},
            "unmask": {"dev-006"}}  # 7 of 40: about 18 %
    server, ints, deltas, examples, plan = _secure_round(40, drop)
    total, count = server.unmasked()
    mean, weight = quantize.decode(total, plan)
    assert count == len(ints) == 34
    exact = np.sum(list(ints.values()), axis=0)  # the plain sum of the same quantized updates, in integers
    assert np.array_equal(total, exact)
    assert not np.array_equal(masking.to_signed(server._sum, plan.bits), exact)  # the sum the server holds is masked
    plain_mean, plain_weight = quantize.decode(exact, plan)
    assert weight == plain_weight and np.array_equal(mean, plain_mean)
    weights = {c: min(examples[c], 50) / 50 for c in ints}
    expected = sum(weights[c] * deltas[c] for c in ints) / sum(weights.values())
    assert np.abs(mean - expected).max() < 0.05 * np.abs(expected).max() + 1e-3


def test_a_secure_round_aborts_when_too_few_devices_survive_a_stage() -> None:
    from fedlite.aggregator.secure_round import RoundAborted

    with pytest.raises(RoundAborted, match="masked inputs arrived"):
        _secure_round(12, {"masked": {f"dev-{i:03d}" for i in range(9)}})


def test_a_secure_round_refuses_replays_strangers_and_wrong_stage_messages() -> None:
    from fedlite.aggregator.secure_round import Refused, SecureRound

    plan = quantize.Quantization(clip=1.0, bound=0.2, levels=100, max_examples=50, participants=5)
    server = SecureRound(CONTEXT, frozenset({"a", "b", "c", "d"}), plan, seed="s", length=plan.length(10))
    people = {c: Participant(c, CONTEXT, 0, 0) for c in "abcd"}
    server.advert("a", people["a"].advert())
    cases = [(lambda: server.advert("a", people["a"].advert()), "duplicate"),
             (lambda: server.advert("e", Participant("e", CONTEXT, 0, 0).advert()), "not_selected"),
             (lambda: server.advert("b", people["c"].advert()), "sender"),
             (lambda: server.masked("a", np.zeros(11, dtype=np.uint64)), "stage")]
    for call, reason in cases:
        with pytest.raises(Refused) as info:
            call()
        assert info.value.reason == reason
    for c in "bcd":
        server.advert(c, people[c].advert())
    server.close_adverts()
    with pytest.raises(Refused) as info:  # a masked input from a device that never dealt its shares
        server.masked("a", np.zeros(11, dtype=np.uint64))
    assert info.value.reason == "stage"


def test_a_secure_rounds_aggregate_is_the_weighted_mean_or_with_privacy_the_noised_sum_over_k() -> None:
    """What the orchestrator commits from an unmasked sum: Σwx / Σw; with [privacy], (Σx + N(0, (zS)^2)) / K, the
    DP-FedAvg mechanism the accountant charges, drawn from the round's noise generator."""
    from types import SimpleNamespace

    from fedlite.aggregator.config import AggregatorConfig, FederationSection, PrivacySection
    from fedlite.aggregator.orchestrators.secure import SecureRounds
    from fedlite.aggregator.secure_exchange import SecureResult

    summed = np.random.default_rng(1).normal(size=100_000)
    result = SecureResult(summed, weight=4.0, mean_norm=1.0, senders={"a", "b", "c", "d"}, dropped=set())
    plain = AggregatorConfig(FederationSection("f"))
    assert np.allclose(SecureRounds(SimpleNamespace(config=plain))._aggregate(3, result), summed / 4.0)
    private = AggregatorConfig(FederationSection("f"), privacy=PrivacySection(enabled=True, clip_norm=0.5,
                                                                              noise_multiplier=2.0, seed=7))
    private.rounds.clients_per_round = 8
    rounds = SecureRounds(SimpleNamespace(config=private))
    noised = rounds._aggregate(3, result)
    noise = noised * 8 - summed
    assert abs(float(np.std(noise)) - 2.0 * 0.5) < 0.01 and abs(float(np.mean(noise))) < 0.01
    assert np.array_equal(noised, rounds._aggregate(3, result))  # the seeded noise of round 3, again
    assert not np.array_equal(noised, rounds._aggregate(4, result))


def test_the_dispatcher_refuses_secure_messages_out_of_a_secure_round_and_evaluations_it_cannot_use(
        tmp_path: Path) -> None:
    """A real aggregator (never connected), fed through its network-thread handler: a secure stage message with no
    secure round open is `late`; an evaluation report for another run is `run`, one without the personalization
    A/B is `metrics`; one with it reaches the KPIs. Each refusal is counted."""
    from fedlite.aggregator.config import AggregatorConfig, FederationSection
    from fedlite.aggregator.ledger import Ledger
    from fedlite.aggregator.service import Aggregator
    from fedlite.protocol import topics
    from fedlite.protocol.messages import DeviceReport, SecureMessage, to_json

    aggregator = Aggregator(AggregatorConfig(federation=FederationSection(name="f", state_dir=str(tmp_path))))
    aggregator.ledger = aggregator.dispatch.ledger = Ledger()
    on = aggregator.dispatch.on_message
    on(topics.secagg_topic("f", "d1"), to_json(SecureMessage("d1", "", 1, "s", "advertise")))
    ab = {"personalized_accuracy": 0.9, "global_accuracy": 0.8}
    on(topics.report_topic("f", "d1"), to_json(DeviceReport("d1", 1, "evaluation", metrics=ab, run="another")))
    on(topics.report_topic("f", "d2"), to_json(DeviceReport("d2", 1, "evaluation", metrics={"accuracy": 0.5})))
    on(topics.report_topic("f", "d3"), to_json(DeviceReport("d3", 1, "evaluation", metrics=ab)))
    assert aggregator.inbox.drain()
    assert aggregator.ledger.totals() == {"secagg": {"late": 1}, "report": {"run": 1, "metrics": 1}}
    assert aggregator.kpis.evaluations == {"d3": (0.9, 0.8)}


def test_a_forged_masked_input_unmasks_out_of_range_and_aborts_the_round() -> None:
    """A device that sends arbitrary ring elements instead of its masked input: the unmasked sum leaves the range
    any K honest inputs can reach, and the round aborts instead of committing it."""
    from fedlite.aggregator.secure_round import RoundAborted

    server, *_ = _secure_round(12, {}, forger="dev-003")
    with pytest.raises(RoundAborted, match="out of range"):
        server.unmasked()
    honest, ints, *_ = _secure_round(12, {})
    total, _ = honest.unmasked()  # the same round without the forger unmasks
    assert np.array_equal(total, np.sum(list(ints.values()), axis=0))
