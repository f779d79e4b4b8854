"""Choosing a round's devices: K x (1 + over-selection) of the eligible by the keyed-hash rule."""

from __future__ import annotations

import math

import numpy as np

from fedlite.protocol import selection
from fedlite.protocol.selection import Selection


def select(eligible: list[str], clients_per_round: int, over_selection: float,
           rng: np.random.Generator) -> tuple[frozenset[str], Selection]:
    """K * (1 + over-selection) eligible devices (all of them when fewer are eligible) by the keyed-hash rule.

    The seed is drawn from `rng` (so `[rounds] seed` makes selection reproducible); returns the aggregator's
    selected set and the `Selection` the announcement carries, under which exactly that set of `eligible` falls.
    """
    want = min(len(eligible), math.ceil(clients_per_round * (1 + over_selection)))
    return selection.choose(eligible, want, rng.bytes(selection.SEED_BYTES).hex())
