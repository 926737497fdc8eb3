from __future__ import annotations

import pytest

from fedtune.core.rng import derive_seed
from fedtune.core.sampling import num_sampled, sample_clients

IDS = [f"client_{i:03d}" for i in range(50)]


def test_same_seed_same_clients_and_rounds_differ() -> None:
    a = [sample_clients(IDS, seed=7, round_idx=r, count=5, fraction=None) for r in range(1, 6)]
    b = [sample_clients(IDS, seed=7, round_idx=r, count=5, fraction=None) for r in range(1, 6)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1  # rounds draw different clients
    c = [sample_clients(IDS, seed=8, round_idx=r, count=5, fraction=None) for r in range(1, 6)]
    assert a != c  # the seed reaches sampling


def test_sample_is_without_replacement_and_in_population() -> None:
    got = sample_clients(IDS, seed=0, round_idx=1, count=20, fraction=None)
    assert len(set(got)) == 20 and set(got) <= set(IDS)


@pytest.mark.parametrize(
    ("k", "count", "fraction", "want"),
    [(100, None, 0.1, 10), (5, None, 0.1, 1), (3, 10, None, 3), (715, None, 0.1, 71)],
)
def test_num_sampled(k: int, count: int | None, fraction: float | None, want: int) -> None:
    assert num_sampled(k, count=count, fraction=fraction) == want


def test_sampling_is_uniform_over_many_rounds() -> None:
    hits = dict.fromkeys(IDS, 0)
    for r in range(2000):
        for cid in sample_clients(IDS, seed=1, round_idx=r, count=5, fraction=None):
            hits[cid] += 1
    expected = 2000 * 5 / 50
    assert all(abs(h - expected) < 0.3 * expected for h in hits.values())


def test_derive_seed_separates_scopes() -> None:
    assert derive_seed(0, "a", 1) != derive_seed(0, "a1")
    assert derive_seed(0, "shuffle", 1, "c") != derive_seed(1, "shuffle", 1, "c")
