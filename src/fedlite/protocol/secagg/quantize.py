"""Quantization that sums: clip, weight, scale and stochastically round each update into integers whose sum over
N devices cannot overflow Z_{2^k}.

The aggregator fixes, per round, the L2 clip bound C, a per-coordinate bound B (a clipped update rarely has a
coordinate beyond a few C / sqrt(d); beyond B it is clamped) and the integer levels L: a coordinate x in [-B, B]
becomes round_stochastic(x * L / B) in [-L, L], unbiased. Weighting, when the sum is all the server sees: each
device pre-multiplies its clipped delta by w = min(n, n_cap) / n_cap (its example count n under the round's cap)
and appends w itself as one more coordinate, so the unmasked sum holds sum(w x) and sum(w), and their ratio is
the example-weighted mean (FedAvg's, with counts capped as `influence` caps them in the clear).

Two more coordinates follow the weight: the device's norm, min(|x|, 2C) / 2C scaled to L (the sum gives the mean
norm, from which the aggregator sets the next round's C without seeing any one norm).

With a `rotation` seed the clipped delta is first rotated (`rotation`, zero-padded to whole blocks): its
coordinates are then near Gaussian with variance |x|^2 / block, so B = a few C / sqrt(block) clamps almost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlite.protocol.messages import SecurePlan
from fedlite.protocol.secagg import rotation as rotations

TAIL = 2  # the weight and the norm, after the delta


@dataclass(frozen=True)
class Quantization:
    """One round's integer plan, broadcast by the aggregator."""

    clip: float  # L2 bound of each update (before weighting)
    bound: float  # per-coordinate clamp B of the weighted, clipped update
    levels: int  # L: a coordinate in [-B, B] maps to an integer in [-L, L]
    max_examples: int  # n_cap: the example count at which the weight reaches 1
    participants: int  # N: how many masked inputs may be summed
    rotation: str = ""  # the public seed of the random rotation ("" none)

    @classmethod
    def of(cls, plan: SecurePlan) -> Quantization:
        """The quantization an announcement's `secure` plan describes."""
        return cls(plan.clip, plan.bound, plan.levels, plan.max_examples, plan.participants, plan.rotation)

    def plan(self, stage_seconds: float) -> SecurePlan:
        """The announcement's `secure` plan for this quantization."""
        return SecurePlan(clip=self.clip, bound=self.bound, levels=self.levels, max_examples=self.max_examples,
                          participants=self.participants, bits=self.bits, rotation=self.rotation,
                          stage_seconds=stage_seconds)

    def length(self, parameters: int) -> int:
        """Integers in one device's vector for a model of `parameters`: the (rotated, padded) delta and the weight."""
        return (rotations.padded_length(parameters) if self.rotation else parameters) + TAIL

    @property
    def bits(self) -> int:
        """k: the smallest ring Z_{2^k} holding any sum of N values in [-L, L] (and the weights') as signed."""
        return max(2, math.ceil(math.log2(2 * self.participants * self.levels + 1)))

    def check(self) -> None:
        if not (self.clip > 0 and self.bound > 0 and self.levels >= 1 and self.max_examples >= 1
                and self.participants >= 1):
            raise ValueError(f"invalid secure aggregation quantization {self}")
        if self.bits > 32:
            raise ValueError(f"{self.participants} participants at {self.levels} levels need {self.bits}-bit sums "
                             "(at most 32): lower the levels")


def encode(delta: np.ndarray, examples: int, plan: Quantization, rng: np.random.Generator) -> np.ndarray:
    """The device's integer vector (int64, each in [-L, L]): its flat delta clipped to C, weighted, clamped to B,
    scaled and stochastically rounded; the weight and the norm are the last two coordinates."""
    flat = np.asarray(delta, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(flat))
    if not math.isfinite(norm):
        raise ValueError("the update is not finite")
    if norm > plan.clip:
        flat = flat * (plan.clip / norm)
    if plan.rotation:
        flat = rotations.rotate(flat, plan.rotation)
    weight = min(max(examples, 0), plan.max_examples) / plan.max_examples
    values = np.concatenate([np.clip(flat * weight, -plan.bound, plan.bound) * (plan.levels / plan.bound),
                             [weight * plan.levels, min(norm, 2 * plan.clip) / (2 * plan.clip) * plan.levels]])
    floor = np.floor(values)
    rounded = floor + (rng.random(values.shape) < values - floor)
    return np.clip(rounded, -plan.levels, plan.levels).astype(np.int64)


def decode(total: np.ndarray, plan: Quantization, parameters: int | None = None) -> tuple[np.ndarray, float]:
    """(the weighted mean delta, flat float32; the total weight) from the signed integer sum; the mean is zeros
    when no weight arrived. `parameters`: the model's (needed to undo a rotation)."""
    summed, weight = decode_sum(total, plan, parameters)
    return weighted_mean(summed, weight).astype(np.float32), weight


def weighted_mean(summed: np.ndarray, weight: float) -> np.ndarray:
    """Σ w x / Σ w; zeros when no weight arrived."""
    return summed / weight if weight > 0 else np.zeros_like(summed)


def decode_sum(total: np.ndarray, plan: Quantization, parameters: int | None = None) -> tuple[np.ndarray, float]:
    """(the weighted sum of the deltas, float64, in the model's coordinates; the total weight)."""
    weight = float(total[-TAIL]) / plan.levels
    summed = total[:-TAIL].astype(np.float64) * (plan.bound / plan.levels)
    if plan.rotation:
        summed = rotations.unrotate(summed, plan.rotation, parameters if parameters is not None else len(summed))
    return summed, weight


def mean_norm(total: np.ndarray, plan: Quantization, count: int) -> float:
    """The mean of min(|x|, 2C) over the `count` inputs the sum holds."""
    return float(total[-1]) / plan.levels * 2 * plan.clip / max(1, count)
