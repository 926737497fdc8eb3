"""The SecAgg+ neighbour graph (Bell et al. 2020): each client masks with, and shares its secrets among,
only k neighbours instead of all n - 1, so client cost grows with log n rather than n.

We use a Harary graph H(k, n) (a k-regular ring lattice: each node joined to the k/2 nearest on each side)
over a permutation of the roster drawn from a public per-round seed, as Flower's SecAgg+ does. k is
rounded up to even; k >= n - 1 gives the complete graph of Bonawitz et al. 2017.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _permutation(ids: Sequence[str], seed: bytes) -> list[str]:
    """A public, seed-determined order (sort by keyed hash): every party computes the same graph."""
    return sorted(ids, key=lambda cid: hashlib.sha256(seed + cid.encode()).digest())


def neighbour_graph(ids: Sequence[str], *, k: int | None, seed: bytes) -> dict[str, frozenset[str]]:
    """Each client's neighbours (symmetric, irreflexive).

    >>> g = neighbour_graph([f"c{i}" for i in range(10)], k=4, seed=b"s")
    >>> sorted(len(v) for v in g.values()) == [4] * 10, all(a in g[b] for a in g for b in g[a])
    (True, True)
    """
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("client ids must be distinct")
    if k is None or k >= n - 1:
        return {cid: frozenset(i for i in ids if i != cid) for cid in ids}
    half = (k + 1) // 2
    order = _permutation(ids, seed)
    graph: dict[str, set[str]] = {cid: set() for cid in ids}
    for pos, cid in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            graph[cid].add(other)
            graph[other].add(cid)
    return {cid: frozenset(v) for cid, v in graph.items()}
