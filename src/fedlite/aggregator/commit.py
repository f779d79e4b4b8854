"""Committing a round: the server step and its bound, evaluation, privacy accounting, KPIs, checkpoint, history."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlite.aggregator.checkpoint import Checkpoint, save_checkpoint
from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.export import Exporter
from fedlite.aggregator.fleet import Fleet
from fedlite.aggregator.kpis import KpiTracker
from fedlite.aggregator.ledger import Ledger
from fedlite.aggregator.metrics import Metrics
from fedlite.aggregator.record import RoundRecord
from fedlite.aggregator.rounds import RoundOutcome
from fedlite.aggregator.strategies import dp
from fedlite.fsutil import write_atomic

log = logging.getLogger("fedlite.aggregator")

Weights = dict[str, np.ndarray]


class CommitRefused(RuntimeError):
    """A round's new global weights are not fit to be the model (non-finite, or a step beyond the bound)."""


def check_step(old: Weights, new: Weights, max_ratio: float) -> None:
    """Raise CommitRefused if `new` is non-finite, or moved further than `max_ratio` x the old weights' norm."""
    for name, value in new.items():
        if not np.all(np.isfinite(value)):
            raise CommitRefused(f"the new weights hold NaN or Inf (in {name!r})")
    if max_ratio <= 0:
        return
    step = float(np.sqrt(sum(np.sum(np.square(new[k] - old[k], dtype=np.float64)) for k in old)))
    scale = float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in old.values())))
    if step > max_ratio * max(scale, 1.0):
        raise CommitRefused(f"the step's norm {step:.4g} exceeds {max_ratio:g} x the weights' norm {scale:.4g}")


def write_history(state_dir: Path, history: list[dict[str, Any]]) -> None:
    write_atomic(state_dir / "history.json", json.dumps(history, indent=1).encode())


@dataclass
class Committer:
    """Turns a complete round attempt into the next global model, durably, or refuses it (CommitRefused)."""

    config: AggregatorConfig
    optimizer: Any  # strategies.ServerOptimizer
    evaluate: Callable[[Weights], dict[str, Any]]
    kpis: KpiTracker
    ledger: Ledger
    metrics: Metrics
    fleet: Fleet
    exporter: Exporter
    state_dir: Path
    meta: dict[str, Any]  # federation and model_hash, kept in every checkpoint
    history: list[dict[str, Any]]  # the run's history, appended to in place

    def commit(self, number: int, outcome: RoundOutcome, weights: Weights, opt_state: Any) -> tuple[Weights, Any]:
        new_weights, opt_state = self.optimizer.step(weights, outcome.aggregate, opt_state)
        check_step(weights, new_weights, self.config.server.max_step_ratio)
        weights = new_weights
        record = outcome.record
        evaluation = self.evaluate(weights)
        record.accuracy, record.loss = evaluation["accuracy"], evaluation["loss"]
        self.charge_privacy(record)
        record.kpis = self.kpis.observe(record, outcome.cosines)
        record.completed_at = time.time()
        record.refusals = self.ledger.take()
        self.history.append(record.to_dict())
        save_checkpoint(self.state_dir / "checkpoints", Checkpoint(
            round=number, weights=weights, optimizer_state=self.optimizer.state_to_arrays(opt_state),
            history=self.history, meta=self.meta,
        ))
        write_history(self.state_dir, self.history)
        self.metrics.round_closed(record)
        self.metrics.fleet(self.fleet.counts())
        every = self.config.model.export_every
        if (every and number % every == 0) or number == self.config.rounds.total:
            self.exporter.submit(number, weights, {"round": number, "accuracy": record.accuracy, "loss": record.loss})
        log.info("round %d complete: %d/%d accepted, %d declined, %d rejected, accuracy %s, %.1f s%s", number,
                 record.accepted, record.selected, record.declined, record.rejected_total,
                 "n/a" if record.accuracy is None else f"{record.accuracy:.3f}", record.duration_seconds,
                 "" if record.epsilon is None else f", ε {record.epsilon:.3g} at δ {record.delta:g}")
        return weights, opt_state

    def charge_privacy(self, record: RoundRecord) -> None:
        """The round's DP charge and the ε spent by all DP rounds so far (recounted from the history)."""
        p = self.config.privacy
        if not p.enabled:
            return
        fleet_size = p.fleet_size or self.fleet.counts()["known"]
        charge = dp.RoundCharge(sampling_rate=dp.sampling_rate(record.selected, fleet_size),
                                noise_multiplier=p.noise_multiplier, clip_norm=p.clip_norm, fleet_size=fleet_size,
                                denominator=float(self.config.rounds.clients_per_round))
        record.privacy = dp.charge_record(charge)
        record.epsilon = dp.history_epsilon([*self.history, record.to_dict()], p.delta)
        record.delta = p.delta
