"""Client partitions of the demo tasks: disjoint, complete, and as skewed as their scheme promises."""

from __future__ import annotations

import numpy as np
import pytest

from fedlite.demo.datasets import TASKS, load_task
from fedlite.demo.partition import (
    PartitionError,
    describe,
    dirichlet,
    iid,
    label_entropy,
    partition,
    shards,
)


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_task("digits", seed=0).y_train


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "every example is in exactly one part"
    assert np.array_equal(np.sort(joined), np.arange(n))


def _mean_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([label_entropy(np.bincount(labels[p], minlength=10)) for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "mcmahan"])
@pytest.mark.parametrize("clients", [1, 5, 10])
def test_partitions_are_disjoint_and_cover_all(digits_labels: np.ndarray, scheme: str, clients: int) -> None:
    parts = partition(scheme, digits_labels, clients, np.random.default_rng(3), alpha=0.3)
    assert len(parts) == clients
    _assert_disjoint_cover(parts, len(digits_labels))


def test_iid_sizes_differ_by_at_most_one(digits_labels: np.ndarray) -> None:
    sizes = [len(p) for p in iid(digits_labels, 7, 0)]
    assert max(sizes) - min(sizes) <= 1


def test_small_alpha_is_more_skewed_than_large_alpha(digits_labels: np.ndarray) -> None:
    skewed = [_mean_entropy(digits_labels, dirichlet(digits_labels, 10, 0.1, s)) for s in range(3)]
    uniform = [_mean_entropy(digits_labels, dirichlet(digits_labels, 10, 100.0, s)) for s in range(3)]
    assert max(skewed) < min(uniform)
    assert min(uniform) > 0.95 * np.log2(10)  # alpha=100 is nearly IID
    assert max(skewed) < 0.7 * np.log2(10)


def test_dirichlet_respects_min_size(digits_labels: np.ndarray) -> None:
    parts = dirichlet(digits_labels, 20, 0.1, np.random.default_rng(0), min_size=20)
    assert min(len(p) for p in parts) >= 20
    _assert_disjoint_cover(parts, len(digits_labels))


def test_dirichlet_is_reproducible(digits_labels: np.ndarray) -> None:
    a, b = dirichlet(digits_labels, 8, 0.5, 42), dirichlet(digits_labels, 8, 0.5, 42)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_min_size_that_cannot_be_met_raises_a_clear_error(digits_labels: np.ndarray) -> None:
    with pytest.raises(PartitionError, match="lower min_size or use fewer clients"):
        dirichlet(digits_labels, 10, 0.5, 0, min_size=len(digits_labels))
    health = load_task("health", seed=0).y_train  # two classes: alpha=0.01 puts each class on ~one client
    with pytest.raises(PartitionError, match=r"in 50 draws.*raise alpha"):
        dirichlet(health, 20, 0.01, 0, min_size=15, max_tries=50)
    with pytest.raises(PartitionError, match="alpha must be positive"):
        dirichlet(digits_labels, 4, 0.0, 0)
    with pytest.raises(PartitionError, match="partition scheme"):
        partition("random", digits_labels, 4, 0)


def test_shards_give_each_client_few_labels(digits_labels: np.ndarray) -> None:
    parts = shards(digits_labels, 10, 2, np.random.default_rng(0))
    labels_per_client = [len(np.unique(digits_labels[p])) for p in parts]
    assert max(labels_per_client) <= 2  # 20 shards over 10 labels: one label per shard
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 6  # class sizes differ a little


@pytest.mark.parametrize("clients", [3, 7, 13])
def test_unaligned_shards_span_at_most_two_labels_each(digits_labels: np.ndarray, clients: int) -> None:
    parts = shards(digits_labels, clients, 2, np.random.default_rng(clients))
    _assert_disjoint_cover(parts, len(digits_labels))
    shard_labels = -(-10 // (2 * clients)) + 1  # labels one equal-size shard can span
    assert max(len(np.unique(digits_labels[p])) for p in parts) <= 2 * shard_labels
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2


def test_shards_reject_too_many_shards() -> None:
    with pytest.raises(PartitionError, match="too few"):
        shards(np.arange(10) % 2, 4, 3, 0)


def test_describe_counts_labels_per_client(digits_labels: np.ndarray) -> None:
    parts = shards(digits_labels, 10, 2, 1)
    rows = describe(digits_labels, parts)
    assert [r["size"] for r in rows] == [len(p) for p in parts]
    assert sum(sum(r["histogram"]) for r in rows) == len(digits_labels)
    for row, part in zip(rows, parts, strict=True):
        assert len(row["histogram"]) == 10
        assert row["labels"] == {int(k): int(v) for k, v in zip(*np.unique(digits_labels[part], return_counts=True),
                                                                   strict=True)}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_float32_with_stratified_splits(name: str) -> None:
    task = load_task(name, seed=1)
    assert task.x_train.dtype == np.float32 and task.x_test.dtype == np.float32
    assert task.x_train.shape[1:] == task.input_shape and task.y_train.dtype == np.int64
    total = task.num_train + task.num_test
    assert abs(task.num_test - 0.25 * total) <= 1
    train_share = np.bincount(task.y_train) / task.num_train
    test_share = np.bincount(task.y_test) / task.num_test
    assert np.allclose(train_share, test_share, atol=0.03)
    if name in ("health", "wine"):  # standardized with training-set statistics
        assert np.allclose(task.x_train.mean(axis=0), 0, atol=1e-4)
        assert np.allclose(task.x_train.std(axis=0), 1, atol=1e-3)


def test_unknown_task_names_the_available_ones() -> None:
    with pytest.raises(KeyError, match="digits"):
        load_task("mnist", 0)


def test_mcmahan_shards_are_equal_cuts_of_the_label_sorted_order(digits_labels: np.ndarray) -> None:
    from fedlite.demo.partition import mcmahan

    parts = mcmahan(digits_labels, 100, 2, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2  # 200 shards of len // 200 or one more, two each
    labels_per_client = [len(np.unique(digits_labels[p])) for p in parts]
    assert max(labels_per_client) <= 4 and np.mean(labels_per_client) < 2.5  # a shard straddles two labels at most


def test_a_partition_file_gives_each_client_its_indices_and_a_bad_one_is_one_clear_error(tmp_path) -> None:
    import json

    from fedlite.demo.partition import PartitionError, from_file

    good = tmp_path / "parts.json"
    good.write_text(json.dumps([[0, 1, 2], [3, 4], [9]]))
    assert [list(p) for p in from_file(str(good), 10, 3)] == [[0, 1, 2], [3, 4], [9]]
    for content, message in (([[0, 1], [1, 2], [3]], "two clients"), ([[0], [1]], "list of 3"),
                             ([[0], [1], [10]], "indices in 0..9")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(PartitionError, match=message):
            from_file(str(bad), 10, 3)
