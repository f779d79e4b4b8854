"""The round's neighbour graph: each device shares keys and masks with O(log N) others, not all (SecAgg+).

Bell et al. use a random k-regular graph; as in their evaluation (and Flower's SecAgg+), it is a Harary graph
H(k, n) on a random permutation of the participants: a ring in which each device is joined to the k/2 nearest on
each side. The permutation comes from the aggregator's per-round seed (SHA-256 of the seed and each id), so every
device computes the same graph from the broadcast without a list of edges.
"""

from __future__ import annotations

import hashlib
import math


def neighbour_count(participants: int) -> int:
    """k = 2 * ceil(1.5 * log2 N), at most N - 1 (then every pair): 10 at N = 10 (all pairs), 20 at N = 100, 30 at
    N = 1,000. Bell et al. bound k = O(log N) with constants from the security and drop-out parameters; this
    choice matches Flower SecAgg+'s default of 30 shares at N = 1,000."""
    if participants < 2:
        return 0
    return min(participants - 1, 2 * math.ceil(1.5 * math.log2(participants)))


def ring(participants: list[str], seed: str) -> list[str]:
    """The participants in the round's random order."""
    return sorted(participants, key=lambda c: hashlib.sha256(f"{seed}/{c}".encode()).digest())


def neighbours(participants: list[str], seed: str, k: int) -> dict[str, list[str]]:
    """{device: its k neighbours} (symmetric; every device's list sorted)."""
    order = ring(participants, seed)
    n, half = len(order), k // 2
    if k >= n - 1:  # every pair
        return {c: sorted(set(order) - {c}) for c in order}
    graph: dict[str, set[str]] = {c: set() for c in order}
    for i, c in enumerate(order):
        for step in range(1, half + 1):
            other = order[(i + step) % n]
            if other != c:
                graph[c].add(other)
                graph[other].add(c)
    return {c: sorted(v) for c, v in graph.items()}
