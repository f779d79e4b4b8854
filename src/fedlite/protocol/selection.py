"""Round selection by a keyed hash: the announcement carries a seed and a threshold, each device decides alone."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

RULE = "sha256-64"
SEED_BYTES = 16  # 128 bits, drawn anew for every round attempt
MAX_THRESHOLD = 1 << 64  # a draw is below it always: every device selected
_SEED = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Selection:
    """Who takes part in a round: the devices whose draw under `seed` is below `threshold` (rule "sha256-64").

    draw(id) = the first 8 bytes of sha256(bytes.fromhex(seed) + id.encode("utf-8")), as a big-endian
    unsigned integer; a device is selected iff draw(id) < threshold. Construction refuses anything else
    (ValueError): another rule, a seed that is not 32 lowercase hex digits, a threshold outside [0, 2^64].
    """

    rule: str
    seed: str
    threshold: int

    def __post_init__(self) -> None:
        if self.rule != RULE:
            raise ValueError(f"rule {self.rule!r} is not one this side implements ({RULE!r})")
        if not isinstance(self.seed, str) or not _SEED.fullmatch(self.seed):
            raise ValueError(f"seed must be {2 * SEED_BYTES} lowercase hex digits ({SEED_BYTES} bytes), "
                             f"not {str(self.seed)[:40]!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) \
                or not 0 <= self.threshold <= MAX_THRESHOLD:
            raise ValueError(f"threshold must be an integer in [0, 2^64], not {str(self.threshold)[:40]}")


def draw(seed: str, client_id: str) -> int:
    """A device's 64-bit draw for a seed: sha256(seed bytes || UTF-8 id), first 8 bytes, big-endian."""
    return _draw(bytes.fromhex(seed), client_id)


def is_selected(selection: Selection | Mapping[str, Any] | Any, client_id: str) -> bool:
    """Whether `client_id` takes part: one hash, whatever the number selected.

    `selection` is a `Selection`, or anything that carries one: a `RoundAnnouncement`, or the JSON object of
    an announcement or of its `selection` field (as parsed by `json.loads`).
    """
    return draw((s := _selection_of(selection)).seed, client_id) < s.threshold


def choose(eligible: Iterable[str], want: int, seed: str) -> tuple[frozenset[str], Selection]:
    """The threshold just above the `want`-th smallest draw among `eligible`, and the eligible devices below it.

    That is exactly `want` devices (all of them when fewer are eligible), unless the `want`-th and the next
    draw are equal (two ids sharing 64 bits of sha256): then every device tied at that draw is selected too,
    so the set is always what the rule yields. Devices outside `eligible` may also fall below the threshold.
    """
    key = bytes.fromhex(seed)
    draws = sorted((_draw(key, c), c) for c in set(eligible))
    want = max(0, min(want, len(draws)))
    threshold = draws[want - 1][0] + 1 if want else 0
    return frozenset(c for d, c in draws if d < threshold), Selection(RULE, seed, threshold)


def nobody() -> Selection:
    """A selection no device falls under (the final `done` announcement)."""
    return Selection(RULE, "0" * (2 * SEED_BYTES), 0)


def _draw(key: bytes, client_id: str) -> int:
    return int.from_bytes(hashlib.sha256(key + client_id.encode("utf-8")).digest()[:8], "big")


def _selection_of(value: Selection | Mapping[str, Any] | Any) -> Selection:
    if isinstance(value, Selection):
        return value
    if isinstance(value, Mapping):
        fields = value.get("selection", value)
        if not isinstance(fields, Mapping):
            raise ValueError("selection must be an object")
        return Selection(fields.get("rule", ""), fields.get("seed", ""), fields.get("threshold", -1))
    return _selection_of(value.selection)
