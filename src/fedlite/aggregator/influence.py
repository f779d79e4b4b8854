"""Bounds on one device's influence on a round: its example weight and its update norm, both robust and adaptive.

A device states its own example count and computes its own update, so neither can be trusted as is:

- **Weight**: the weight of an update is ``min(num_examples, max_examples, example_multiple * m)``, where m is
  the median example count the round's selected devices advertise in their statuses. One device claiming
  10^6 examples weighs at most `example_multiple` times a typical device.
- **Norm**: an update beyond ``norm_refuse_multiple * median`` of a reference set of norms is refused as an
  outlier (``norm_outlier``); any other is clipped to ``norm_multiple * median``
  (norm bounding, Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019; the bound
  tracks the norms the fleet actually sends, in the spirit of Andrew, Thakkar, McMahan, Ramaswamy, "Differentially
  Private Learning with Adaptive Clipping", NeurIPS 2021). The reference is the accepted updates' norms of the
  last `norm_window` complete rounds. In a run's first round there is no reference yet: the round holds its first
  `warmup` valid updates, takes the median of their norms as the reference, then clips and folds them.
  Clipped and refused updates are flagged (``record["norm_flagged"]``; refused ones also in ``norm_refused``).
  With the defaults (2x weight, 2x norm) one device moves a round at most about 4x as much as a typical one.

The configured absolute ``[server] max_update_norm`` (if > 0) still applies on top.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class _Normed(Protocol):
    norm: float


Held = TypeVar("Held", bound=_Normed)


def weight_cap(advertised: Iterable[int], multiple: float, max_examples: int) -> float:
    """The largest weight an update may carry this round, from the selected devices' advertised counts."""
    counts = [n for n in advertised if n > 0]
    if not counts:
        return float(max_examples)
    return float(min(max_examples, max(1.0, multiple * statistics.median(counts))))


def reference_norms(history: list[dict[str, Any]], window: int) -> list[float]:
    """Accepted update norms of the last `window` complete rounds of the history."""
    complete = [r for r in history if r.get("status") == "complete"][-window:] if window else []
    return [float(n) for r in complete for n in (r.get("update_norms") or {}).values() if n > 0]


@dataclass
class NormBound(Generic[Held]):
    """One round's adaptive norm rule: clip beyond `multiple` x the reference median, refuse beyond
    `refuse_multiple` x (0: never refuse). With no reference (None: no adaptive bound at all) and an empty one
    the first `warmup` updates are held until their own median is the reference. Not thread-safe: the round's
    lock covers it."""

    reference: list[float] | None
    multiple: float = 2.0
    refuse_multiple: float = 10.0
    warmup: int = 3
    median: float | None = None
    held: list[Held] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.reference:
            self.median = statistics.median(self.reference)

    @property
    def bound(self) -> float | None:
        """The clip bound in force (None: none, or still warming up)."""
        return None if self.median is None else self.multiple * self.median

    @property
    def warming_up(self) -> bool:
        return self.reference is not None and self.median is None

    def refuses(self, norm: float) -> bool:
        """Beyond `refuse_multiple` times the reference median: refused, not merely clipped."""
        limit = self.refuse_multiple * self.median if self.median is not None else 0.0
        return limit > 0 and norm > limit

    def hold(self, update: Held) -> list[Held]:
        """Hold an update during the warm-up; once `warmup` are held, the reference is known and all are released."""
        self.held.append(update)
        return self.release() if len(self.held) >= self.warmup else []

    def release(self) -> list[Held]:
        """The held updates' median norm becomes the reference; the held updates are returned to be judged."""
        if not self.held:
            return []
        self.median = statistics.median(u.norm for u in self.held)
        held, self.held = self.held, []
        return held
