"""Seeded partitioners (pool -> clients) and per-client train/test splits.

Every partitioner is a pure function of its inputs and the generator it is handed: it returns one sorted
index array per client, and every index in ``range(n)`` appears in exactly one of them. Indices are sorted
so a client's records keep their pool order (which matters for temporal splits of text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from fedtune.errors import DataError

R = TypeVar("R")

# Hsu et al. resample the per-class proportions until no client is (nearly) empty. The bound keeps a
# hopeless request (tiny alpha, many clients, few examples) from looping forever.
MAX_DIRICHLET_TRIES = 200


def _check_counts(n: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise DataError(f"data.partition.num_clients must be >= 1, got {num_clients}")
    if min_size < 0:
        raise DataError(f"min_size must be >= 0, got {min_size}")
    if num_clients * max(min_size, 1) > n:
        raise DataError(
            f"cannot give {num_clients} clients at least {max(min_size, 1)} example(s) each from {n} "
            "examples: lower data.partition.num_clients"
        )


def _sorted_parts(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform shuffle into ``num_clients`` near-equal parts (sizes differ by at most one)."""
    _check_counts(n, num_clients)
    return _sorted_parts(np.array_split(rng.permutation(n), num_clients))


def _split_by_proportions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut ``indices`` into consecutive pieces whose sizes follow ``proportions`` (floored cut points)."""
    cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
    return np.split(indices, cuts)


def _dirichlet_label_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        for client, piece in enumerate(_split_by_proportions(members, proportions)):
            shares[client].append(piece)
    return _sorted_parts([np.concatenate(s) for s in shares])


def dirichlet_labels(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is spread over clients by its own Dir(alpha) draw.

    The whole draw is repeated until every client holds at least ``min_size`` examples; after
    ``MAX_DIRICHLET_TRIES`` failures a DataError suggests a larger alpha or fewer clients.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {labels.shape}")
    if alpha <= 0:
        raise DataError(f"data.partition.alpha must be > 0, got {alpha}")
    _check_counts(len(labels), num_clients, min_size)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_label_draw(labels, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"dirichlet_labels: no draw in {MAX_DIRICHLET_TRIES} tries gave all {num_clients} clients at least "
        f"{min_size} of {len(labels)} examples with alpha={alpha}: raise data.partition.alpha or lower "
        "data.partition.num_clients"
    )


def dirichlet_sizes(
    n: int, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow Dir(alpha) shares of the pool; labels are left iid.

    Each client first receives ``min_size`` examples and the rest are dealt by a multinomial draw on the
    Dirichlet shares, so the minimum holds without resampling (the skew is that of the remainder).
    """
    if alpha <= 0:
        raise DataError(f"data.partition.alpha must be > 0, got {alpha}")
    _check_counts(n, num_clients, min_size)
    shares = rng.dirichlet(np.full(num_clients, alpha))
    sizes = min_size + rng.multinomial(n - num_clients * min_size, shares)
    cuts = np.cumsum(sizes)[:-1]
    return _sorted_parts(np.split(rng.permutation(n), cuts))


def split_counts(n: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) sizes: ``test_fraction`` of n rounded half up, at least one on each side when n >= 2.

    A single record stays in train: a client with nothing to train on is useless, one without held-out
    data only drops out of evaluation.
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        return n, 0
    n_test = min(max(math.floor(n * test_fraction + 0.5), 1), n - 1)
    return n - n_test, n_test


def temporal_split(records: Sequence[R], test_fraction: float) -> tuple[list[R], list[R]]:
    """First records train, last records test: held-out text comes after what the client trained on."""
    n_train, _ = split_counts(len(records), test_fraction)
    return list(records[:n_train]), list(records[n_train:])


def random_split(records: Sequence[R], test_fraction: float, rng: np.random.Generator) -> tuple[list[R], list[R]]:
    """A seeded random test subset; both sides keep the records' original relative order."""
    _, n_test = split_counts(len(records), test_fraction)
    test_idx = set(rng.choice(len(records), size=n_test, replace=False).tolist()) if n_test else set()
    train = [r for i, r in enumerate(records) if i not in test_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    return train, test
