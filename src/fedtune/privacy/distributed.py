"""Distributed DP: each client adds Skellam noise to its own update inside secure aggregation (Agarwal,
Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning"), so no party,
the server included, ever sees an un-noised sum. Pure functions over flat buffers.

    client:  x   <- clip(x, C)                                        its own C, from its own config
             y   =  x * s                                             s integer steps per unit
             r   =  round(y), unbiased randomized rounding            ||r||_2 <= C s + sqrt(d) always
             v   =  r + Sk(mu_l) per coordinate                       Sk = Poisson(mu_l/2) - Poisson(mu_l/2)
             v mod 2^32 is the client's SecAgg input (two's complement)
    server:  S   =  sum_k v_k mod 2^32, lifted to (-2^31, 2^31]       SecAgg unmasks only this
             sum ~= S / s                                             noise Sk(m mu_l): m survivors' shares

Rounding and noise draw from a client-private seed (``os.urandom``), never from the config's seed: the
server cannot subtract them. A sum of independent Skellams is Skellam, so m surviving clients give noise
Sk(m mu_l) of variance m mu_l per coordinate; mu_l is set so that the planned number of survivors gives the
variance (z C s)^2 of central DP-FedAvg with noise multiplier z.

Accounting (``skellam_rdp``, Agarwal et al. 2021, Theorem 3.5 / Corollary 3.6): for integer alpha > 1, an
integer query with L2 and L1 sensitivities D2, D1 and noise Sk of variance mu per coordinate is
(alpha, eps(alpha))-RDP with

    eps(alpha) = alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)).

The first term is the Gaussian mechanism's at the same variance; the rest is the price of integers. With
replace-one adjacency (the set of clients is public and the noise is always m shares) one client moves the
sum by at most D2 = 2 (C s + sqrt(d)) and, the vector being integer, D1 = min(sqrt(d) D2, D2^2). No
amplification by sampling is claimed (see docs/PRIVACY.md). Each round is charged at the noise of its
actual survivors (their number is data-independent: assumption 6), so a round with dropouts is charged more.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FIELD_BITS = 32  # the SecAgg field 2^32 carries the noised integers in two's complement
TAIL_SIGMAS = 8.0  # the sum stays inside (-2^31, 2^31) unless the noise exceeds 8 standard deviations


@functools.cache
def orders() -> tuple[int, ...]:
    """dp-accounting's default RDP orders that are integers (the Skellam bound holds for integer alpha).
    Imported on first use: the participant imports this module, and dp-accounting costs seconds to load."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(int(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if float(a).is_integer() and a >= 2)


@dataclass(frozen=True)
class SkellamPlan:
    """Everything both sides derive from the config (never from each other) for one update length."""

    scale: float  # s: integer steps per unit of the update
    clip: float  # C
    dim: int  # d
    local_variance: float  # mu_l: the Skellam variance per coordinate each client adds
    planned_clients: int  # m_plan: survivors the noise is split among
    max_clients: int  # the most summands the field is sized for
    noise_multiplier: float  # z: the planned sum's noise std is z C (in the update's units)

    @property
    def l2(self) -> float:
        """L2 bound of one client's rounded, scaled update."""
        return self.clip * self.scale + math.sqrt(self.dim)

    def sensitivity(self) -> tuple[float, float]:
        """(D2, D1) of the integer sum under replace-one adjacency."""
        d2 = 2.0 * self.l2
        return d2, min(math.sqrt(self.dim) * d2, d2 * d2)

    def variance(self, survivors: int) -> float:
        """The sum's Skellam variance per coordinate, in integer units, with ``survivors`` shares."""
        return survivors * self.local_variance

    def noise_std(self, survivors: int) -> float:
        """The same in the update's units (comparable to central DP's z C)."""
        return math.sqrt(self.variance(survivors)) / self.scale


def make_plan(*, clip: float, noise_multiplier: float, dim: int, planned_clients: int, max_clients: int) -> SkellamPlan:
    """The scale s is the finest that keeps the lifted sum of up to ``max_clients`` clients inside the field:
    each rounded coordinate is at most C s + 1 in magnitude, and the noise of ``max_clients`` shares stays
    below TAIL_SIGMAS standard deviations.

    >>> p = make_plan(clip=1.0, noise_multiplier=1.0, dim=100, planned_clients=10, max_clients=40)
    >>> bound = 40 * (p.scale + 1) + TAIL_SIGMAS * math.sqrt(40 * p.local_variance)
    >>> bool(bound < 2**31), round(p.noise_std(10), 6)
    (True, 1.0)
    """
    if planned_clients < 1 or max_clients < planned_clients or dim < 1:
        raise ValueError("need dim >= 1 and 1 <= planned_clients <= max_clients")
    if not clip > 0 or not noise_multiplier > 0:
        raise ValueError("clip and noise_multiplier must be positive")
    half = 2.0 ** (FIELD_BITS - 1) - 1
    # max_clients (C s + 1) + T z C s sqrt(max / planned) <= half, solved for s
    spread = max_clients + TAIL_SIGMAS * noise_multiplier * math.sqrt(max_clients / planned_clients)
    scale = (half - max_clients) / (clip * spread)
    variance = (noise_multiplier * clip * scale) ** 2 / planned_clients
    return SkellamPlan(scale, clip, dim, variance, planned_clients, max_clients, noise_multiplier)


def private_rng() -> np.random.Generator:
    """A generator seeded from the OS, known to this client alone."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


def skellam(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the symmetric Skellam distribution of the given variance (int64)."""
    lam = variance / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def encode(x: np.ndarray, plan: SkellamPlan, rng: np.random.Generator) -> np.ndarray:
    """One client's noised integer vector (int64): clip to C, scale, round at random, add its Skellam share.
    Never mutates ``x``."""
    if x.shape != (plan.dim,):
        raise ValueError(f"update has shape {x.shape}, the plan is for {plan.dim} values")
    values = x.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the update has non-finite values")
    norm = float(np.linalg.norm(values))
    if norm > plan.clip:
        values = values * (plan.clip / norm)
    scaled = values * plan.scale
    floor = np.floor(scaled)
    rounded = (floor + (rng.random(plan.dim) < scaled - floor)).astype(np.int64)  # E[rounded] = scaled
    return rounded + skellam(plan.dim, plan.local_variance, rng)


def to_field(v: np.ndarray) -> np.ndarray:
    """int64 -> uint32 residues mod 2^32 (two's complement)."""
    return (v & np.int64(0xFFFFFFFF)).astype(np.uint32)


def lift(total: np.ndarray, plan: SkellamPlan) -> np.ndarray:
    """The float64 sum from the unmasked sum mod 2^32: centred lift to (-2^31, 2^31], then / s."""
    t = np.asarray(total).astype(np.int64) & np.int64(0xFFFFFFFF)
    signed = np.where(t >= 1 << (FIELD_BITS - 1), t - (1 << FIELD_BITS), t)
    return signed.astype(np.float64) / plan.scale


# ----- accounting ----------------------------------------------------------------------------------------


def skellam_rdp(alpha: int, l2: float, l1: float, variance: float) -> float:
    """Agarwal et al. 2021's RDP bound of the Skellam mechanism at integer order ``alpha`` (module docstring)."""
    if alpha < 2 or int(alpha) != alpha:
        raise ValueError("the Skellam RDP bound is for integer orders alpha >= 2")
    gaussian = alpha * l2**2 / (2.0 * variance)
    return gaussian + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4.0 * variance**2), 3.0 * l1 / (2.0 * variance))


def entry(plan: SkellamPlan, survivors: int, count: int = 1) -> dict:
    """A ledger entry (fedtune.privacy.accountant) for ``count`` rounds with ``survivors`` noise shares."""
    d2, d1 = plan.sensitivity()
    return {"sampling": "skellam", "l2": d2, "l1": d1, "mu": plan.variance(survivors), "count": int(count)}


def epsilon(entries: Sequence[dict], delta: float) -> float:
    """Epsilon at ``delta`` of composed Skellam ledger entries: RDP summed per order, converted by
    dp-accounting's ``compute_epsilon`` (the conversion its RdpAccountant uses)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    rdp = [sum(e["count"] * skellam_rdp(a, e["l2"], e["l1"], e["mu"]) for e in entries) for a in orders()]
    eps, _ = rdp_privacy_accountant.compute_epsilon(orders(), rdp, delta)
    return float(eps)


def plan_for(
    *, clip: float, noise_multiplier: float, dim: int, clients_per_round: int, expected_dropout: float
) -> SkellamPlan:
    """The plan both sides build from the config: the noise split among the survivors expected of
    ``clients_per_round`` at ``expected_dropout``; the field sized for 4 x clients_per_round summands."""
    planned = max(1, math.floor(clients_per_round * (1.0 - expected_dropout)))
    return make_plan(
        clip=clip,
        noise_multiplier=noise_multiplier,
        dim=dim,
        planned_clients=planned,
        max_clients=4 * clients_per_round,
    )


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    *,
    rounds: int,
    clip: float,
    dim: int,
    clients_per_round: int,
    expected_dropout: float,
) -> float:
    """The smallest z (to 1e-6 relative) whose ``rounds`` rounds with the planned survivors spend at most
    ``target_epsilon``. Deterministic in its arguments, so server and clients compute the same z."""

    def eps(z: float) -> float:
        p = plan_for(
            clip=clip,
            noise_multiplier=z,
            dim=dim,
            clients_per_round=clients_per_round,
            expected_dropout=expected_dropout,
        )
        return epsilon([entry(p, p.planned_clients, rounds)], delta)

    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {rounds} rounds")
    while hi - lo > 1e-6 * hi:  # bisection keeps eps(hi) <= target
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi
