"""Client selection as a pure function of (seed, round): reproducible, and identical after a resume.

Two schemes: a uniform fixed-size sample without replacement (the default), and Poisson sampling, where
each client joins independently with probability q (what DP's amplification-by-sampling accounts). With
``secure=True`` (production DP) both draw from the OS's CSPRNG instead and are not reproducible: who was
sampled must stay unpredictable for the amplification to hold.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

from fedtune.core.rng import derive_rng


def num_sampled(num_clients: int, *, count: int | None, fraction: float | None) -> int:
    """How many clients a round samples: a fixed count (capped at the population) or max(1, C * K)."""
    if count is not None:
        return min(count, num_clients)
    if fraction is None:
        raise ValueError("need count or fraction")
    return max(1, min(num_clients, math.floor(fraction * num_clients + 1e-9)))


def sampling_rate(num_clients: int, *, count: int | None, fraction: float | None) -> float:
    """Poisson rate q: the fraction if given, else count / population (capped at 1).

    >>> sampling_rate(100, count=10, fraction=None), sampling_rate(100, count=None, fraction=0.25)
    (0.1, 0.25)
    """
    if num_clients < 1:
        raise ValueError("the population is empty")
    if fraction is not None:
        return float(fraction)
    if count is None:
        raise ValueError("need count or fraction")
    return min(1.0, count / num_clients)


def poisson_sample(
    client_ids: Sequence[str], *, seed: int, round_idx: int, rate: float, secure: bool = False
) -> list[str]:
    """Each client independently with probability ``rate`` (possibly none), in the population's order.

    >>> ids = [f"c{i}" for i in range(1000)]
    >>> 50 < len(poisson_sample(ids, seed=0, round_idx=1, rate=0.1)) < 150
    True
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {rate}")
    if secure:
        rng = secrets.SystemRandom()
        return [cid for cid in client_ids if rng.random() < rate]
    draws = derive_rng(seed, "poisson-sampling", round_idx).random(len(client_ids))
    return [cid for cid, u in zip(client_ids, draws, strict=True) if u < rate]


def sample_clients(
    client_ids: Sequence[str],
    *,
    seed: int,
    round_idx: int,
    count: int | None,
    fraction: float | None,
    secure: bool = False,
) -> list[str]:
    """Uniformly sample clients without replacement for one round, in the population's order.

    >>> ids = [f"c{i}" for i in range(10)]
    >>> sample_clients(ids, seed=1, round_idx=3, count=3, fraction=None) == \
        sample_clients(ids, seed=1, round_idx=3, count=3, fraction=None)
    True
    """
    k = num_sampled(len(client_ids), count=count, fraction=fraction)
    if secure:
        chosen = np.array(secrets.SystemRandom().sample(range(len(client_ids)), k), dtype=np.int64)
    else:
        chosen = derive_rng(seed, "sampling", round_idx).choice(len(client_ids), size=k, replace=False)
    return [client_ids[i] for i in sorted(chosen.tolist())]
