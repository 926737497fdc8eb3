"""Partitioners and train/test splits: exact cover, determinism, and that alpha controls the skew."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.core.rng import derive_rng
from fedtune.data.partition import (
    dirichlet_labels,
    dirichlet_sizes,
    iid,
    random_split,
    split_counts,
    temporal_split,
)
from fedtune.errors import DataError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 examples, 10 balanced classes


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "some index is missing or repeated"
    assert np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert np.array_equal(p, np.sort(p)), "indices within a client are sorted"


def mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for p in parts:
        counts = np.bincount(labels[p], minlength=labels.max() + 1)
        probs = counts[counts > 0] / counts.sum()
        entropies.append(float(-(probs * np.log(probs)).sum()))
    return float(np.mean(entropies))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 30), seed=st.integers(0, 2**32))
def test_iid_is_an_exact_balanced_cover(n: int, k: int, seed: int) -> None:
    if k > n:
        with pytest.raises(DataError):
            iid(n, k, derive_rng(seed, "p"))
        return
    parts = iid(n, k, derive_rng(seed, "p"))
    assert len(parts) == k
    assert_exact_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 300),
    k=st.integers(1, 10),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_partitions_are_exact_covers(n: int, k: int, alpha: float, seed: int) -> None:
    labels = np.arange(n) % 4
    by_label = dirichlet_labels(labels, k, alpha, derive_rng(seed, "l"))
    by_size = dirichlet_sizes(n, k, alpha, derive_rng(seed, "s"))
    for parts in (by_label, by_size):
        assert len(parts) == k
        assert_exact_cover(parts, n)
        assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: iid(500, 7, rng),
        lambda rng: dirichlet_labels(LABELS, 7, 0.5, rng),
        lambda rng: dirichlet_sizes(500, 7, 0.5, rng),
    ],
    ids=["iid", "dirichlet_labels", "dirichlet_sizes"],
)
def test_reproducible_from_seed_and_seed_sensitive(make) -> None:
    first = make(derive_rng(3, "partition"))
    again = make(derive_rng(3, "partition"))
    other = make(derive_rng(4, "partition"))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_small_alpha_gives_more_label_skew() -> None:
    skewed = [mean_label_entropy(dirichlet_labels(LABELS, 10, 0.05, derive_rng(s, "p")), LABELS) for s in range(5)]
    mixed = [mean_label_entropy(dirichlet_labels(LABELS, 10, 100.0, derive_rng(s, "p")), LABELS) for s in range(5)]
    # uniform over 10 classes has entropy log(10) ~ 2.30; alpha=100 should be close to it
    assert np.mean(mixed) > 2.1
    assert np.mean(skewed) < 1.2
    iid_entropy = mean_label_entropy(iid(1000, 10, derive_rng(0, "p")), LABELS)
    assert iid_entropy > 2.2


def test_small_alpha_gives_more_quantity_skew() -> None:
    def size_cv(alpha: float) -> float:
        cvs = []
        for s in range(5):
            sizes = np.array([len(p) for p in dirichlet_sizes(2000, 20, alpha, derive_rng(s, "p"))])
            cvs.append(sizes.std() / sizes.mean())
        return float(np.mean(cvs))

    assert size_cv(0.2) > 4 * size_cv(100.0)
    assert size_cv(100.0) < 0.2


def test_dirichlet_sizes_honours_min_size() -> None:
    parts = dirichlet_sizes(100, 10, 0.01, derive_rng(0, "p"), min_size=5)
    assert min(len(p) for p in parts) >= 5
    assert_exact_cover(parts, 100)


def test_dirichlet_labels_honours_min_size() -> None:
    parts = dirichlet_labels(LABELS, 5, 1.0, derive_rng(0, "p"), min_size=50)
    assert min(len(p) for p in parts) >= 50


@pytest.mark.parametrize(
    "call",
    [
        lambda: iid(5, 6, derive_rng(0)),
        lambda: dirichlet_labels([0, 1, 0, 1, 2], 6, 1.0, derive_rng(0)),
        lambda: dirichlet_sizes(5, 6, 1.0, derive_rng(0)),
        lambda: dirichlet_sizes(10, 3, 1.0, derive_rng(0), min_size=4),
        lambda: iid(5, 0, derive_rng(0)),
    ],
)
def test_too_many_clients_is_a_data_error(call) -> None:
    with pytest.raises(DataError, match="num_clients"):
        call()


def test_hopeless_label_skew_gives_up_with_a_hint() -> None:
    # 20 examples for 20 clients with a tiny alpha: essentially never does every client get one
    with pytest.raises(DataError, match="alpha"):
        dirichlet_labels(np.arange(20) % 2, 20, 0.01, derive_rng(0))


def test_inputs_are_not_mutated() -> None:
    labels = LABELS.copy()
    dirichlet_labels(labels, 4, 0.5, derive_rng(0))
    assert np.array_equal(labels, LABELS)


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(10, 0.2, (8, 2)), (2, 0.2, (1, 1)), (1, 0.5, (1, 0)), (0, 0.5, (0, 0)), (5, 0.5, (2, 3)), (3, 0.9, (1, 2))],
)
def test_split_counts(n: int, fraction: float, expected: tuple[int, int]) -> None:
    assert split_counts(n, fraction) == expected


def test_temporal_split_holds_out_the_end() -> None:
    train, test = temporal_split(list("abcdefghij"), 0.2)
    assert train == list("abcdefgh")
    assert test == ["i", "j"]


def test_random_split_is_seeded_and_keeps_order() -> None:
    records = list(range(50))
    train, test = random_split(records, 0.2, derive_rng(1, "split", "c"))
    assert len(test) == 10
    assert sorted(train + test) == records
    assert train == sorted(train) and test == sorted(test)
    assert test != records[-10:]  # not temporal
    assert random_split(records, 0.2, derive_rng(1, "split", "c")) == (train, test)
    assert random_split(records, 0.2, derive_rng(2, "split", "c"))[1] != test
    assert records == list(range(50))
