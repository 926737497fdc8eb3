"""Client selection as a pure function of (seed, round): reproducible, and identical after a resume."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedtune.core.rng import derive_rng


def num_sampled(num_clients: int, *, count: int | None, fraction: float | None) -> int:
    """How many clients a round samples: a fixed count (capped at the population) or max(1, C * K)."""
    if count is not None:
        return min(count, num_clients)
    if fraction is None:
        raise ValueError("need count or fraction")
    return max(1, min(num_clients, math.floor(fraction * num_clients + 1e-9)))


def sample_clients(
    client_ids: Sequence[str], *, seed: int, round_idx: int, count: int | None, fraction: float | None
) -> list[str]:
    """Uniformly sample clients without replacement for one round, in the population's order.

    >>> ids = [f"c{i}" for i in range(10)]
    >>> sample_clients(ids, seed=1, round_idx=3, count=3, fraction=None) == \
        sample_clients(ids, seed=1, round_idx=3, count=3, fraction=None)
    True
    """
    k = num_sampled(len(client_ids), count=count, fraction=fraction)
    rng = derive_rng(seed, "sampling", round_idx)
    chosen = rng.choice(len(client_ids), size=k, replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]
