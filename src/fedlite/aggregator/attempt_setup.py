"""What every round attempt is built from, by the configuration: its validation context and its reducer."""

from __future__ import annotations

from typing import Any

from fedlite.aggregator.config import AggregatorConfig
from fedlite.aggregator.strategies import dp, make_aggregator
from fedlite.aggregator.validation import RoundContext


def round_context(config: AggregatorConfig, manifest: dict[str, Any], number: int, selected: frozenset[str],
                  run: str) -> RoundContext:
    """How round `number`'s updates are checked (DP: every update clipped to S on admission)."""
    s = config.server
    bound, policy = s.max_update_norm, s.norm_policy
    if config.privacy.enabled:
        bound, policy = config.privacy.clip_norm, "clip"
    return RoundContext(
        federation=config.federation.name, round=number, model_hash=manifest["model_hash"], manifest=manifest,
        selected=frozenset(selected), max_examples=s.max_examples, max_update_norm=bound, norm_policy=policy,
        max_abs_value=s.max_abs_value, run=run, encoding=config.training.encoding,
    )


def round_reducer(config: AggregatorConfig, specs: list[tuple[str, tuple[int, ...]]], number: int) -> Any:
    """Round `number`'s reducer, a registered one (DP-FedAvg wraps the mean: equal weights, clipped to S, noise on
    the sum, fixed denominator K); the attempt folds it per worker thread."""
    p = config.privacy
    if p.enabled:
        params = dp.DpParams(p.clip_norm, p.noise_multiplier, float(config.rounds.clients_per_round))
        return dp.wrap(make_aggregator("mean", specs, sum_dtype="float64"), params, dp.noise_rng(p.seed, number))
    aggregation = config.server.aggregation
    return make_aggregator(aggregation, specs, config=config.server.strategies[aggregation])
