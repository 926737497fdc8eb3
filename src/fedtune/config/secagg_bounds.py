"""The bounds SecAgg's parameters are chosen by, for availability: the SecAgg+ degree k and the share
threshold t from the expected dropout rate and a target failure probability, as Bell et al. 2020 (Section 4)
choose them.

A round aborts when some client's secret cannot be recovered: fewer than t of its k neighbours reach the
unmasking stage (every earlier check in fedtune.privacy.secagg.server is implied by this last one, since
the clients still answering at unmasking also answered every stage before). With each client dropping
independently with probability delta, a neighbour count is Binomial(k, 1 - delta), and a union bound over
the n clients gives

    P(abort) <= n * P[Binomial(k, 1 - delta) < t]                                            (availability)

(in the complete graph every client sees the same survivors, and P(abort) = P[Binomial(n, 1 - delta) <= t]).

Security needs t > k / 2 (two disjoint halves of a neighbourhood can never both reconstruct; the config's
threshold > 1/2) and a survivor graph that stays connected, else the server learns the sums of the
separate pieces. In the Harary graph H(k, n) (privacy/secagg/graph.py: a ring lattice of half-width h = k / 2 over a
random order) a piece splits off only where h consecutive clients all drop, so

    P(split) <= n * delta^h                                                                  (security)

Against a malicious server colluding with corrupted clients, the consistency round holds while every
neighbourhood has fewer than 2t - k of them (docs/PRIVACY.md); with each client corrupted independently
with probability gamma (``expected_corrupt``, Bell et al.'s gamma)

    P(collusion) <= n * P[Binomial(k, gamma) >= 2t - k]                                      (collusion)

``plan`` takes the smallest t above k / 2 meeting the collusion bound (just above k / 2 at gamma = 0: the
most dropouts a secure threshold tolerates) and the smallest even k meeting all three bounds at the
target; the complete graph (Bonawitz et al. 2017) when no k < n - 1 does. The bounds assume dropouts
(and corruptions) independent of each other; correlated outages (a region going down) need a larger
``expected_dropout``.

Pure functions of numbers (scipy's binomial tails, no state, no randomness). They sit in ``config`` because
they resolve the ``privacy.secure_aggregation`` section's null ``neighbours`` and ``threshold`` and check
given ones when the config is loaded (``config.privacy.check_secagg_availability``); the protocol
(``fedtune.privacy.secagg``) uses the same functions for the plan of each round and a client's floors.
``fedtune.privacy.secagg.availability`` checks them against a simulation of the real graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def shares_needed(threshold: float, degree: int) -> int:
    """t for a client with ``degree`` neighbours (the rule of ``client.share_threshold``)."""
    return max(2, math.ceil(threshold * degree - 1e-9))


def minimal_threshold(num_clients: int) -> float:
    """The smallest fraction whose t is just above half of any degree up to ``num_clients - 1``.

    >>> th = minimal_threshold(100)
    >>> [shares_needed(th, d) for d in (4, 5, 80, 99)]
    [3, 3, 41, 50]
    """
    return 0.5 + 1.0 / (4 * max(num_clients, 2))


def degree(num_clients: int, neighbours: int) -> int:
    """Neighbours per client: ``neighbours`` rounded up to even, or n - 1 for the complete graph (0 or >= n - 1)."""
    if neighbours == 0 or neighbours >= num_clients - 1:
        return num_clients - 1
    return 2 * ((neighbours + 1) // 2)


def abort_bound(num_clients: int, neighbours: int, threshold: float, dropout: float) -> float:
    """Union bound on the probability that a round of ``num_clients`` aborts (module docstring)."""
    from scipy.stats import binom  # here, not at the top: clients import this module, scipy.stats is slow

    k = degree(num_clients, neighbours)
    t = shares_needed(threshold, k)
    if t > k:
        return 1.0
    if k == num_clients - 1:
        # complete graph: every owner sees the same survivors U4 (less itself), so no union is needed:
        # it aborts iff |U4| - 1 < t, with |U4| ~ Binomial(n, 1 - delta) (t at the full roster: the largest)
        return float(binom.cdf(t, num_clients, 1.0 - dropout))
    return min(1.0, num_clients * float(binom.cdf(t - 1, k, 1.0 - dropout)))


def split_bound(num_clients: int, neighbours: int, dropout: float) -> float:
    """Bound on the probability that the survivors' graph falls apart (0 for the complete graph)."""
    k = degree(num_clients, neighbours)
    if k >= num_clients - 1:
        return 0.0
    return min(1.0, num_clients * dropout ** (k // 2))


def secure_degree(num_clients: int, dropout: float, failure_probability: float) -> int:
    """The smallest even k whose survivor graph splits with probability <= ``failure_probability`` at
    ``dropout`` (the security bound above); 0, the complete graph, when no k < n - 1 does. ``plan`` never
    picks less: its k meets this bound at the number invited, hence at any roster as small or smaller.

    >>> secure_degree(100, 0.3, 0.01), secure_degree(5, 0.3, 0.01)
    (16, 0)
    """
    for k in range(2, num_clients - 1, 2):
        if split_bound(num_clients, k, dropout) <= failure_probability:
            return k
    return 0


def collusion_bound(num_clients: int, neighbours: int, threshold: float, corrupt: float) -> float:
    """Bound on the probability that some client's neighbourhood holds 2t - k or more corrupted clients,
    each corrupted independently with probability ``corrupt`` (Bell et al.'s gamma): with that many
    colluding with a malicious server, two survivor sets can each gather t signatures in the consistency
    round and both of a client's secrets can be revealed (docs/PRIVACY.md). Union bound over the n clients
    (one neighbourhood suffices in the complete graph). 0 when ``corrupt`` is 0.

    >>> collusion_bound(100, 84, 0.5025, 0.0), collusion_bound(100, 84, 0.5025, 0.05) > 0.5
    (0.0, True)
    """
    from scipy.stats import binom

    k = degree(num_clients, neighbours)
    t = shares_needed(threshold, k)
    if corrupt <= 0:
        return 0.0
    tail = float(binom.sf(2 * t - k - 1, k, corrupt))  # P[Binomial(k, corrupt) >= 2t - k]
    return min(1.0, tail if k == num_clients - 1 else num_clients * tail)


def collusion_threshold(num_clients: int, neighbours: int, corrupt: float, failure_probability: float) -> float | None:
    """The smallest threshold fraction whose t keeps ``collusion_bound`` <= ``failure_probability`` for this
    graph, or None when even t = k does not. With ``corrupt`` 0: just above 1/2 (``minimal_threshold``).

    >>> collusion_threshold(100, 84, 0.0, 0.01) == minimal_threshold(100)
    True
    >>> th = collusion_threshold(100, 84, 0.05, 0.01); shares_needed(th, 84)  # 2t - k = 14 >> 84 * 0.05
    49
    """
    if corrupt <= 0:
        return minimal_threshold(num_clients)
    k = degree(num_clients, neighbours)
    for t in range(k // 2 + 1, k + 1):
        frac = t / k
        safe = collusion_bound(num_clients, neighbours, frac, corrupt) <= failure_probability
        if safe and shares_needed(frac, k) == t:
            return frac
    return None


@dataclass(frozen=True)
class SecAggPlan:
    neighbours: int  # k of the SecAgg+ graph; 0: the complete graph
    threshold: float  # t = shares_needed(threshold, degree)
    abort_bound: float  # P(round aborts) <= this, at the expected dropout
    split_bound: float  # P(survivor graph disconnected) <= this
    chosen: bool  # False: the config gave both k and the threshold
    collusion_bound: float = 0.0  # P(some neighbourhood holds 2t - k corrupted clients) <= this


def plan(
    num_clients: int,
    *,
    dropout: float,
    failure_probability: float,
    threshold: float | None = None,
    neighbours: int | None = None,
    corrupt: float = 0.0,
) -> SecAggPlan:
    """k and the threshold for a round of ``num_clients``; either may be fixed by the caller (then only the
    other is chosen, and the bounds say what the fixed one costs). With ``corrupt`` > 0 the threshold of
    each candidate k is raised until its neighbourhoods hold fewer than 2t - k corrupted clients (at the
    target), and k grows until that t is still available at ``dropout``.

    >>> p = plan(100, dropout=0.3, failure_probability=0.01)
    >>> p.neighbours, shares_needed(p.threshold, p.neighbours), p.abort_bound <= 0.01
    (84, 43, True)
    """
    if num_clients < 1:
        raise ValueError("need at least one client")

    def made(k: int) -> SecAggPlan:
        frac = threshold if threshold is not None else collusion_threshold(num_clients, k, corrupt, failure_probability)
        frac = frac if frac is not None else 1.0  # no t meets the collusion target: the bound says so
        return SecAggPlan(
            neighbours=k,
            threshold=frac,
            abort_bound=abort_bound(num_clients, k, frac, dropout),
            split_bound=split_bound(num_clients, k, dropout),
            chosen=threshold is None or neighbours is None,
            collusion_bound=collusion_bound(num_clients, k, frac, corrupt),
        )

    if neighbours is not None:
        return made(0 if neighbours >= num_clients - 1 else neighbours)
    for k in range(2, num_clients - 1, 2):
        candidate = made(k)
        bounds = (candidate.abort_bound, candidate.split_bound, candidate.collusion_bound)
        if max(bounds) <= failure_probability:
            return candidate
    return made(0)
