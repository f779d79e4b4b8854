"""DP-FedAvg: user-level differential privacy for federated averaging, and its privacy accounting.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018.
Each round, every accepted update (a device's whole contribution) is clipped to L2 norm ``S = clip_norm``,
the clipped deltas are summed with equal weights, Gaussian noise ``N(0, (z * S)^2)`` is added to every
coordinate of the sum (``z = noise_multiplier``), and the result is divided by a *fixed* denominator: the
paper's ``qN`` estimator, i.e. the expected number of participants. We use ``clients_per_round`` (K), the
number of updates a round is built to accept. The denominator never depends on who actually took part, so
adding or removing one device changes the noised sum by at most S (the sensitivity), and a round closed
below K at its deadline simply yields a smaller step (unbiased under the sampling assumption below).

Accounting uses Google's ``dp_accounting`` RDP accountant (Mironov, "Rényi Differential Privacy", 2017;
Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019): every DP round
is a ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, composed over rounds, converted to (ε, δ) under the
add-or-remove-one-device relation. Assumptions, which the guarantee depends on:

* sampling: each device takes part in a round independently with probability ``q``. The aggregator in fact
  draws a fixed-size sample uniformly from the devices that are *eligible* (online, idle, charging, ...);
  Poisson accounting of that is the usual approximation, and eligibility that correlates with a device's
  data weakens it. ``q`` is taken as ``selected / fleet_size``, capped at 1: over-selected devices may
  contribute too, so this is the conservative side of ``K / N``.
* trust: the aggregator is trusted (central DP). The guarantee covers what is *released* from the
  aggregator (global weights, exported models, evaluation on the server's test set: post-processing);
  the aggregator's own history.json (per-device update norms and training metrics) is not privatized.
* abandoned attempts (below quorum) release no aggregate and are not charged.
* noise: numpy's generators are not cryptographically secure, and floating-point Gaussian samples are
  open to the attack of Mironov, "On Significance of the Least Significant Bits for Differential Privacy",
  CCS 2012. With no seed configured the generator is seeded from the OS CSPRNG (``secrets``), a reasonable
  default for research deployments; a production system should draw noise from a CSPRNG-backed, discretized
  sampler (e.g. the discrete Gaussian). A configured seed makes the noise reproducible, for tests only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedlite.aggregator.deltas import Delta, as_delta
from fedlite.aggregator.strategies import fedavg
from fedlite.aggregator.strategies.robust import clip_by_global_norm

Specs = list[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class DpParams:
    """The mechanism for one round: clip to `clip_norm`, noise std ``noise_multiplier * clip_norm``."""

    clip_norm: float
    noise_multiplier: float
    denominator: float  # the fixed denominator: expected participants (clients_per_round)

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and self.noise_multiplier >= 0 and self.denominator > 0):
            raise ValueError(f"need clip_norm > 0, noise_multiplier >= 0, denominator > 0; got {self}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the *sum* of clipped deltas."""
        return self.noise_multiplier * self.clip_norm


# --- the mechanism ------------------------------------------------------------------------------


def noise_rng(seed: int, round_: int) -> np.random.Generator:
    """The round's noise generator: reproducible from (seed, round) when seed >= 0, else seeded by `secrets`."""
    if seed < 0:
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([seed, round_])


def clip(delta: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """`delta` scaled to global L2 norm <= `clip_norm` (inputs untouched); returns (clipped, norm before)."""
    return clip_by_global_norm(delta, clip_norm)


def add_noise(sums: dict[str, np.ndarray], std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`sums` plus i.i.d. N(0, std^2) per coordinate, in float64 (new arrays)."""
    return {name: np.asarray(value, np.float64) + rng.normal(0.0, std, size=np.shape(value))
            for name, value in sums.items()}


def noised_mean(state: fedavg.RunningSum, params: DpParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(sum of clipped deltas + noise) / fixed denominator, as float32."""
    noised = add_noise(state.sums, params.noise_std, rng)
    return {name: (value / params.denominator).astype(np.float32) for name, value in noised.items()}


class DpMeanAggregator:
    """DP-FedAvg as a wrapper around the mean reducer: it owns clipping (every update to S, equal weights)
    and adds the noise to the sum once, at `result`."""

    def __init__(self, specs: Specs, params: DpParams, rng: np.random.Generator,
                 inner: fedavg.MeanAggregator | None = None) -> None:
        self.params = params
        self.rng = rng
        self.inner = inner if inner is not None else fedavg.MeanAggregator(specs, "float64")

    def add(self, delta: Delta | dict[str, np.ndarray], weight: float = 1.0) -> None:
        del weight  # equal weights: an example count would raise one device's influence above clip_norm
        delta = as_delta(delta)
        norm = delta.norm()
        if norm > self.params.clip_norm:
            delta = delta.scaled(self.params.clip_norm / norm)
        self.inner.add(delta, 1.0)

    def fresh(self) -> DpMeanAggregator:
        return DpMeanAggregator([], self.params, self.rng, self.inner.fresh())

    def absorb(self, other: DpMeanAggregator) -> None:
        self.inner.absorb(other.inner)

    @property
    def count(self) -> int:
        return self.inner.count

    def result(self) -> dict[str, np.ndarray]:
        return noised_mean(self.inner.state, self.params, self.rng)


def wrap(inner: Any, params: DpParams, rng: np.random.Generator) -> DpMeanAggregator:
    """The reducer `inner` under DP-FedAvg; only the (streaming, sum-based) mean can be noised this way."""
    if not isinstance(inner, fedavg.MeanAggregator):
        raise ValueError(f"differential privacy wraps the mean reducer, not {type(inner).__name__}")
    return DpMeanAggregator([], params, rng, inner)


# --- accounting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundCharge:
    """What one DP round costs, as stored in its history record under "privacy"."""

    sampling_rate: float
    noise_multiplier: float
    clip_norm: float
    fleet_size: int
    denominator: float


def sampling_rate(selected: int, fleet_size: int) -> float:
    """q = selected / fleet size, capped at 1 (see the module docstring for the assumption)."""
    if fleet_size <= 0:
        return 1.0
    return min(1.0, selected / fleet_size)


def epsilon(rounds: int, sampling_rate: float, noise_multiplier: float, delta: float) -> float:
    """ε after `rounds` rounds of the Poisson-sampled Gaussian mechanism, at `delta` (RDP accountant)."""
    return epsilon_of_rounds([(sampling_rate, noise_multiplier)] * rounds, delta)


def epsilon_of_rounds(rounds: Iterable[tuple[float, float]], delta: float) -> float:
    """ε of composing one round per (sampling_rate, noise_multiplier) pair; 0 for no rounds."""
    counts = Counter((float(q), float(z)) for q, z in rounds)
    if not counts:
        return 0.0
    if any(z <= 0 for _, z in counts):
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    with _quiet_absl():
        for (q, z), count in sorted(counts.items()):
            accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
        return float(accountant.get_epsilon(delta))


def charges(history: Sequence[Mapping[str, Any]]) -> list[RoundCharge]:
    """The charge of every completed DP round in a run's history (what a resumed run keeps counting)."""
    return [RoundCharge(**record["privacy"]) for record in history
            if record.get("status") == "complete" and record.get("privacy")]


def history_epsilon(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε spent by all completed DP rounds recorded in `history`."""
    return epsilon_of_rounds(((c.sampling_rate, c.noise_multiplier) for c in charges(history)), delta)


def next_round_epsilon(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """ε the run would have spent after one more round charged like its last one (0 before any DP round)."""
    spent = charges(history)
    if not spent:
        return 0.0
    rounds = [(c.sampling_rate, c.noise_multiplier) for c in [*spent, spent[-1]]]
    return epsilon_of_rounds(rounds, delta)


def charge_record(charge: RoundCharge) -> dict[str, Any]:
    return asdict(charge)


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """The accountant warns (via absl) each time a fractional RDP order fails to converge; it then skips that
    order, which can only loosen the bound. Silence those warnings for the call."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
