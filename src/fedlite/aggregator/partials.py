"""Per-worker partial aggregates: each inbox worker folds into its own, and they merge exactly at close."""

from __future__ import annotations

import threading

import numpy as np

from fedlite.aggregator.strategies.registry import Aggregator

Arrays = dict[str, np.ndarray]


class PartialSums:
    """An `Aggregator` that gives every calling thread its own partial (the first thread `base` itself, the others
    ``base.fresh()``), so workers fold updates without a shared lock; `result` absorbs the other partials into
    `base` (in the order the threads first added, so one thread gives exactly the single aggregator's result)
    and reduces once.

    The caller makes sure no `add` is in flight when it calls `result` (the round attempt counts its folds).
    """

    def __init__(self, base: Aggregator) -> None:
        self.base = base
        self._partials: list[Aggregator] = []
        self._local = threading.local()
        self._lock = threading.Lock()

    def _mine(self) -> Aggregator:
        partial = getattr(self._local, "partial", None)
        if partial is None:
            with self._lock:  # the first thread folds into `base` itself: one model-sized sum fewer
                partial = self.base if not self._partials else self.base.fresh()
                self._partials.append(partial)
            self._local.partial = partial
        return partial

    def add(self, delta: Arrays, weight: float) -> None:
        self._mine().add(delta, weight)

    def absorb(self, partial: Aggregator) -> None:
        """A partial filled elsewhere (another aggregator's), merged with the others at `result`."""
        with self._lock:
            self._partials.append(partial)

    @property
    def count(self) -> int:
        with self._lock:
            return self.base.count + sum(p.count for p in self._partials if p is not self.base)

    @property
    def workers(self) -> int:
        """How many threads have folded into a partial of their own."""
        with self._lock:
            return len(self._partials)

    def merged(self) -> Aggregator:
        """`base` with every other partial absorbed (one partial again, not reduced)."""
        with self._lock:
            partials, self._partials = self._partials, []
        for partial in partials:
            if partial is not self.base:
                self.base.absorb(partial)
        self._local = threading.local()
        return self.base

    def result(self) -> Arrays:
        return self.merged().result()
