"""Synchronous rounds under secure aggregation (SecAgg+): the selected devices run the key, masked-input and unmask
stages, and the round's aggregate is the unmasked sum; no single update is ever decoded."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedlite.aggregator.influence import weight_cap
from fedlite.aggregator.orchestrators.sync import SyncRounds
from fedlite.aggregator.record import RoundRecord, records
from fedlite.aggregator.rounds import RoundOutcome
from fedlite.aggregator.secure_exchange import SecureExchange, SecureResult
from fedlite.aggregator.secure_round import RoundAborted, SecureRound
from fedlite.aggregator.strategies import dp
from fedlite.protocol.layout import num_params, unflatten
from fedlite.protocol.secagg import quantize, rotation
from fedlite.protocol.secagg.participant import round_context
from fedlite.protocol.selection import Selection

Weights = dict[str, np.ndarray]


class SecureRounds(SyncRounds):
    """`SyncRounds`' selection; its collection is a `SecureExchange` over a `SecureRound`."""

    def _collect(self, number: int, selected: frozenset[str], selection: Selection,
                 weights: Weights) -> RoundOutcome | None:
        host, cfg = self.host, self.config
        attempt = self._attempt(number, selected, selection)  # its bookkeeping; the exchange collects
        q = self._quantization(selected, attempt.session)
        parameters, sa = num_params(host.manifest), cfg.secure_aggregation
        plan = q.plan(sa.stage_seconds)
        secure = SecureRound(round_context(host.federation, host.run_id(), number, attempt.session), selected, q,
                             seed=attempt.session, length=q.length(parameters), threshold_fraction=sa.threshold,
                             neighbours_wanted=sa.neighbours, parameters=parameters)
        exchange = SecureExchange(host.federation, host.run_id(), attempt, secure, sa.stage_seconds,
                                  host.retained.send, lambda kind, reason, detail: host.refuse(kind, reason, detail,
                                                                                               number),
                                  lambda: host.housekeeping(number, "open"), host.stop_event,
                                  masked_wanted=cfg.rounds.clients_per_round)
        sent = host.downlink.publish(number, weights)
        host.current, host.secure = attempt, exchange
        host.announcer.open(attempt, sent, secure=plan)
        host.log.info("round %d: secure aggregation with %d devices, %d-bit sums, clip %.3g, deadline in %.0f s",
                      number, len(selected), plan.bits, plan.clip, cfg.rounds.deadline_seconds)
        try:
            result = exchange.run()
        except RoundAborted as exc:
            record = attempt.settle(set(), complete=False)
            record.reason = str(exc)
            return self._closed(number, RoundOutcome(False, None, record))
        finally:
            host.secure = None
        if result is None:  # stopping: nobody collects it
            host.announcer.closed(attempt.close(abandon=True).record)
            return None
        record = attempt.settle(result.senders, complete=len(result.senders) >= max(1, cfg.rounds.min_accepted))
        record.examples = round(result.weight * plan.max_examples)
        record.secure_aggregation = {
            "bits": plan.bits, "levels": plan.levels, "clip": plan.clip, "threshold": secure.threshold,
            "neighbours": len(next(iter(secure.graph.values()), [])), "survivors": len(result.senders),
            "dropped": len(result.dropped), "mean_norm": result.mean_norm, "relay_bytes": exchange.relay_bytes,
            "device_cpu_seconds": sum(exchange.device_cpu.values()) / max(1, len(exchange.device_cpu)),
        }
        aggregate = unflatten(self._aggregate(number, result).astype(np.float32), host.manifest)
        return self._closed(number, RoundOutcome(record.complete, aggregate if record.complete else None, record))

    def _closed(self, number: int, outcome: RoundOutcome) -> RoundOutcome:
        self.host.announcer.closed(outcome.record)
        self.host.downlink.withdraw(number)
        return outcome

    def _aggregate(self, number: int, result: SecureResult) -> np.ndarray:
        """The example-weighted mean; with DP, the noised sum over the fixed denominator K (weights are all 1)."""
        p = self.config.privacy
        if not p.enabled:
            return quantize.weighted_mean(result.summed, result.weight)
        params = dp.DpParams(p.clip_norm, p.noise_multiplier, float(self.config.rounds.clients_per_round))
        noise = dp.noise_rng(p.seed, number).normal(0.0, params.noise_std, size=result.summed.shape)
        return (result.summed + noise) / params.denominator

    def _quantization(self, selected: frozenset[str], session: str) -> quantize.Quantization:
        """This round's arithmetic: C (DP: S; else from the last secure round's mean norm), n_cap, B, L, k."""
        cfg, sa = self.config, self.config.secure_aggregation
        clip, max_examples = sa.clip_norm, 1
        if cfg.privacy.enabled:
            clip = cfg.privacy.clip_norm
        else:
            last = _last_secure(self.host.history)
            if sa.clip_multiple and last is not None and last.secure_aggregation.get("mean_norm", 0) > 0:
                clip = sa.clip_multiple * float(last.secure_aggregation["mean_norm"])
            advertised = [max(1, v.status.num_examples) for c, v in self.host.fleet.snapshot().items()
                          if c in selected] or [1]
            cap = weight_cap(advertised, cfg.server.example_multiple, cfg.server.max_examples)
            max_examples = max(1, int(min(max(advertised), cap)))
        block = rotation.block_size(num_params(self.host.manifest))
        q = quantize.Quantization(clip, sa.coordinate_bound * clip / math.sqrt(block), sa.levels, max_examples,
                                  min(len(selected), cfg.rounds.clients_per_round), session)
        q.check()
        return q


def _last_secure(history: list[dict[str, Any]]) -> RoundRecord | None:
    return next((r for r in reversed(records(history)) if r.complete and r.secure_aggregation), None)
