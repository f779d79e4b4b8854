"""Split a labelled data set across simulated clients: IID, Dirichlet label skew, McMahan's two-shard scheme
(label-aligned, or exactly as the paper cuts it), or index lists from a file."""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards", "mcmahan")
DEFAULT_MIN_SIZE = 10
DEFAULT_MAX_TRIES = 1000

Rng = np.random.Generator | int | None


class PartitionError(ValueError):
    """The requested partition cannot be drawn; the message says which knob to turn."""


def _rng(rng: Rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _labels(labels: np.ndarray, clients: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if clients < 1:
        raise PartitionError(f"need at least one client, got {clients}")
    if len(labels) < clients:
        raise PartitionError(f"{len(labels)} examples cannot be split across {clients} clients")
    return labels


def iid(labels: np.ndarray, clients: int, rng: Rng = None) -> list[np.ndarray]:
    """Shuffle and deal the examples into `clients` parts of (nearly) equal size."""
    labels = _labels(labels, clients)
    order = _rng(rng).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, clients)]


def _cut(order: np.ndarray, sorted_labels: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` contiguous shards of the label-sorted order; aligned to label boundaries when count is a multiple
    of the number of labels (each shard then holds one label), else of equal size."""
    present, starts = np.unique(sorted_labels, return_index=True)
    blocks = np.split(order, starts[1:])
    per_label = count // len(present)
    if count % len(present) == 0 and all(len(block) >= per_label for block in blocks):
        return [piece for block in blocks for piece in np.array_split(block, per_label)]
    return np.array_split(order, count)


def shards(labels: np.ndarray, clients: int, shards_per_client: int = 2, rng: Rng = None) -> list[np.ndarray]:
    """Pathological non-IID split (McMahan et al. 2017): sort by label, cut clients*k shards, deal k per client.

    With 10 labels and clients*k a multiple of 10 every shard holds a single label, so a client sees at most k.
    """
    labels = _labels(labels, clients)
    if shards_per_client < 1:
        raise PartitionError(f"need at least one shard per client, got {shards_per_client}")
    count = clients * shards_per_client
    if count > len(labels):
        raise PartitionError(f"{len(labels)} examples are too few for {clients} x {shards_per_client} shards")
    gen = _rng(rng)
    shuffled = gen.permutation(len(labels))  # random order within each label
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = _cut(by_label, labels[by_label], count)
    dealt = gen.permutation(count).reshape(clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def mcmahan(labels: np.ndarray, clients: int, shards_per_client: int = 2, rng: Rng = None) -> list[np.ndarray]:
    """McMahan et al. 2017's pathological split exactly: sort by label, cut clients*k equal shards (a shard may
    straddle two labels), deal k at random to each client."""
    labels = _labels(labels, clients)
    count = clients * shards_per_client
    if count > len(labels):
        raise PartitionError(f"{len(labels)} examples are too few for {clients} x {shards_per_client} shards")
    gen = _rng(rng)
    shuffled = gen.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, count)
    dealt = gen.permutation(count).reshape(clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def _dirichlet_draw(labels: np.ndarray, clients: int, alpha: float, gen: np.random.Generator) -> list[list[int]]:
    """One draw: per class, Dir(alpha) proportions over the clients not yet above the mean size."""
    parts: list[list[int]] = [[] for _ in range(clients)]
    mean_size = len(labels) / clients
    for label in np.unique(labels):
        members = gen.permutation(np.flatnonzero(labels == label))
        proportions = gen.dirichlet(np.full(clients, alpha))
        # Hsu et al. / NIID-Bench balancing: clients already above the mean size take no more of this class.
        proportions *= np.array([len(p) < mean_size for p in parts])
        total = proportions.sum()
        proportions = proportions / total if total > 0 else np.full(clients, 1.0 / clients)
        cuts = (np.cumsum(proportions) * len(members)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(chunk.tolist())
    return parts


def dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: Rng = None, *, min_size: int = DEFAULT_MIN_SIZE,
              max_tries: int = DEFAULT_MAX_TRIES) -> list[np.ndarray]:
    """Label skew: each class is spread over the clients by proportions drawn from Dir(alpha).

    Small alpha (0.1) gives most clients a few labels; large alpha (100) approaches IID. Draws again
    until every client holds at least `min_size` examples, at most `max_tries` times.
    """
    labels = _labels(labels, clients)
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    if clients * min_size > len(labels):
        raise PartitionError(f"{len(labels)} examples cannot give {clients} clients {min_size} each; "
                             "lower min_size or use fewer clients")
    gen = _rng(rng)
    smallest = 0
    for _ in range(max(1, max_tries)):
        parts = _dirichlet_draw(labels, clients, alpha, gen)
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise PartitionError(f"no Dirichlet(alpha={alpha}) split of {len(labels)} examples over {clients} clients "
                         f"gave every client >= {min_size} examples in {max_tries} draws (last smallest: {smallest}); "
                         "raise alpha, lower min_size or use fewer clients")


def partition(scheme: str, labels: np.ndarray, clients: int, rng: Rng = None, *, alpha: float = 0.5,
              shards_per_client: int = 2, min_size: int = DEFAULT_MIN_SIZE) -> list[np.ndarray]:
    """The split named `scheme` (one of SCHEMES)."""
    schemes: dict[str, Any] = {
        "iid": lambda: iid(labels, clients, rng),
        "dirichlet": lambda: dirichlet(labels, clients, alpha, rng, min_size=min_size),
        "shards": lambda: shards(labels, clients, shards_per_client, rng),
        "mcmahan": lambda: mcmahan(labels, clients, shards_per_client, rng),
    }
    if scheme not in schemes:
        raise PartitionError(f"partition scheme must be one of {SCHEMES}, not {scheme!r}")
    return schemes[scheme]()


def from_file(path: str, examples: int, clients: int) -> list[np.ndarray]:
    """Index lists from a JSON file (a list of `clients` lists of example indices, disjoint, in range)."""
    import json

    try:
        with open(path) as f:
            lists = json.load(f)
    except (OSError, ValueError) as exc:
        raise PartitionError(f"partition file {path}: {exc}") from None
    if not isinstance(lists, list) or len(lists) != clients or not all(isinstance(p, list) for p in lists):
        raise PartitionError(f"partition file {path} must hold a list of {clients} index lists (one per client)")
    parts = [np.asarray(p, dtype=np.int64) for p in lists]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if any(len(p) == 0 for p in parts) or (flat.size and (flat.min() < 0 or flat.max() >= examples)):
        raise PartitionError(f"partition file {path}: every client needs indices in 0..{examples - 1}")
    if len(np.unique(flat)) != len(flat):
        raise PartitionError(f"partition file {path}: an example is given to two clients")
    return parts


def label_entropy(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of a label histogram; 0 for a single label."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def describe(labels: np.ndarray, parts: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per client: size, label histogram (all classes, in order), the labels present and their entropy."""
    labels = np.asarray(labels).reshape(-1)
    classes = int(labels.max()) + 1 if labels.size else 0
    rows = []
    for client, part in enumerate(parts):
        hist = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=classes)
        rows.append({"client": client, "size": int(len(part)), "histogram": [int(c) for c in hist],
                     "labels": {int(k): int(c) for k, c in enumerate(hist) if c},
                     "entropy_bits": round(label_entropy(hist), 3)})
    return rows


def format_description(rows: list[dict[str, Any]]) -> str:
    """The output of `describe` as aligned log lines, e.g. `client  3  n=  180  labels {2: 90, 7: 90}`."""
    return "\n".join(f"client {r['client']:2d}  n={r['size']:5d}  H={r['entropy_bits']:.2f} bits  labels {r['labels']}"
                     for r in rows)
