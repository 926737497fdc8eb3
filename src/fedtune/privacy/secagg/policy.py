"""A client's own floor under the parameters a server proposes (Bonawitz et al. 2017's malicious model).

A malicious server that sends threshold 0.01 can ask some neighbours of a victim for the shares of its
mask key s_u ("u dropped") and others for the shares of its self-mask b_u ("u survived"), and strip both
masks. Each client therefore checks every public parameter against its own minimums before it sends
anything, and refuses (SecAggAbort, with the reason) when one falls short:

* threshold: at least ``min_threshold`` and above 1/2 (two disjoint halves can never both reconstruct);
* neighbours: a graph of at least ``min_neighbours`` (0, the complete graph, always passes); and, when
  the client knows its own ``expected_dropout`` / ``failure_probability`` (from_config), at least the k
  Bell et al. 2020's security bound asks of the roster it is shown (secagg_bounds.secure_degree: the
  survivor graph must not split, or the server learns partial sums). The server chooses its k with the
  same bound (secagg_bounds.plan), so an honest server always passes; only a weaker graph is refused.
  The threshold need only be above 1/2 for the secrets (2t > k), which the automatic 1/2 + 1/(4n) is;
  with the client's own ``expected_corrupt`` (gamma) > 0, t must also keep every neighbourhood below
  2t - k corrupted clients within its ``failure_probability`` (secagg_bounds.collusion_bound), the
  consistency round's condition; the server raises t by the same rule;
* number of clients: at least ``min_clients`` in the roster, and no more than the field can sum unwrapped;
* field: at most 32 bits, levels that fit; bounds finite and positive (the clip range the client expects);
* graph seed: the one derived from the run's seed and the round (the server cannot pick the graph).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from fedtune.config.secagg_bounds import collusion_bound, secure_degree
from fedtune.core.rng import derive_seed
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.messages import PublicParams
from fedtune.privacy.secagg.quantize import MAX_FIELD_BITS

ABSOLUTE_MIN_CLIENTS = 3  # a sum over fewer would be (nearly) an individual update


def graph_seed(seed: int, round_idx: int) -> bytes:
    """The round's public neighbour-graph seed: a function of the run's seed, so every party can check it."""
    return hashlib.sha256(f"secagg-graph/{derive_seed(seed, 'secagg-graph', round_idx)}".encode()).digest()


@dataclass(frozen=True)
class ClientPolicy:
    min_threshold: float = 0.5  # the threshold must be at least this, and strictly above 1/2
    min_neighbours: int = 2  # k >= this, or the complete graph (neighbours 0)
    min_clients: int = ABSOLUTE_MIN_CLIENTS
    clip_range: float | None = None  # without DP: the coordinate bound the client expects (None: any)
    seed: int | None = None  # the run's seed: the graph seed must be graph_seed(seed, round) (None: any)
    round: int | None = None  # the round the client trained for (None: any)
    # the client's own availability targets: the k the security bound needs is recomputed from them and the
    # roster's size (None: no such floor beyond min_neighbours)
    expected_dropout: float | None = None
    failure_probability: float | None = None
    expected_corrupt: float = 0.0  # gamma: the threshold must keep neighbourhoods below 2t - k corrupted

    @classmethod
    def permissive(cls) -> ClientPolicy:
        """Only the absolute floors (tests and benchmarks that build PublicParams by hand)."""
        return cls()

    @classmethod
    def from_config(cls, cfg, *, seed: int, round_idx: int | None = None) -> ClientPolicy:
        """The floors a client's own ``privacy.secure_aggregation`` section sets (see config/privacy.py):
        ``min_threshold`` / ``min_neighbours``, else the section's own ``threshold`` / ``neighbours`` when
        they are given, else the absolute floors (threshold above 1/2, 2 neighbours); with ``neighbours``
        null (chosen per round), also the degree the security bound needs at the client's own
        ``expected_dropout`` and ``failure_probability`` (check_roster)."""
        return cls(
            min_threshold=_first(cfg.min_threshold, cfg.threshold, 0.5),
            min_neighbours=_first(cfg.min_neighbours, cfg.neighbours, 2),
            min_clients=cfg.min_clients,
            clip_range=cfg.clip_range,
            seed=seed,
            round=round_idx,
            expected_dropout=cfg.expected_dropout if cfg.neighbours is None else None,
            failure_probability=cfg.failure_probability,
            expected_corrupt=cfg.expected_corrupt,
        )

    def check_params(self, p: PublicParams, who: str) -> None:
        """Refuse an invitation whose parameters fall below this client's floors."""

        def refuse(why: str) -> SecAggAbort:
            return SecAggAbort(f"client {who} refuses the secure aggregation round: {why}")

        if not (math.isfinite(p.threshold) and p.threshold > 0.5 and p.threshold >= self.min_threshold - 1e-12):
            raise refuse(f"threshold {p.threshold:g} is below this client's minimum {max(self.min_threshold, 0.5):g}")
        if p.threshold > 1:
            raise refuse(f"threshold {p.threshold:g} is above 1")
        if p.neighbours != 0 and p.neighbours < max(2, self.min_neighbours):
            raise refuse(f"{p.neighbours} neighbours is below this client's minimum {self.min_neighbours}")
        if not 1 <= p.modulus_bits <= MAX_FIELD_BITS or not 1 <= p.levels < (1 << p.modulus_bits):
            raise refuse(f"a {p.modulus_bits}-bit field with {p.levels} levels is not a valid field")
        for name, value in (("bound", p.bound), ("l2_bound", p.l2_bound)):
            if not math.isfinite(value) or value < 0:
                raise refuse(f"{name} {value!r} is not a finite non-negative number")
        if p.bound <= 0:
            raise refuse("the clip range is zero")
        if p.l2_bound == 0 and self.clip_range is not None and not math.isclose(p.bound, self.clip_range):
            raise refuse(f"clip range {p.bound:g} differs from this client's clip_range {self.clip_range:g}")
        if p.l2_bound > 0 and not math.isclose(p.bound, p.l2_bound):
            raise refuse(f"under DP the clip range {p.bound:g} must equal the L2 bound {p.l2_bound:g}")
        if self.round is not None and p.round != self.round:
            raise refuse(f"the invitation is for round {p.round}, this client trained for round {self.round}")
        if self.seed is not None and p.graph_seed != graph_seed(self.seed, p.round):
            raise refuse("the neighbour-graph seed is not the one the run's seed gives for this round")

    def check_roster(self, p: PublicParams, n: int, who: str) -> None:
        """Refuse a roster too small to hide an input, or too large for the field to sum without wrapping."""
        if n < max(self.min_clients, ABSOLUTE_MIN_CLIENTS):
            raise SecAggAbort(
                f"client {who} refuses the secure aggregation round: {n} clients in the roster, "
                f"this client requires at least {max(self.min_clients, ABSOLUTE_MIN_CLIENTS)}"
            )
        if self.expected_dropout is not None and self.failure_probability is not None and p.neighbours != 0:
            need = secure_degree(n, self.expected_dropout, self.failure_probability)
            if p.neighbours < n - 1 and (need == 0 or p.neighbours < need):
                wanted = "the complete graph" if need == 0 else f"at least {need} neighbours"
                raise SecAggAbort(
                    f"client {who} refuses the secure aggregation round: {p.neighbours} neighbours in a roster of "
                    f"{n} is below the {wanted} its expected_dropout {self.expected_dropout:g} and "
                    f"failure_probability {self.failure_probability:g} need (the survivor graph could split)"
                )
        if self.expected_corrupt > 0 and self.failure_probability is not None:
            bound = collusion_bound(n, p.neighbours, p.threshold, self.expected_corrupt)
            if bound > self.failure_probability:
                raise SecAggAbort(
                    f"client {who} refuses the secure aggregation round: threshold {p.threshold:g} with "
                    f"{p.neighbours or 'all'} neighbours in a roster of {n} lets 2t - k colluding clients into a "
                    f"neighbourhood with probability up to {bound:.3g} at its expected_corrupt "
                    f"{self.expected_corrupt:g}, above its failure_probability {self.failure_probability:g}"
                )
        if n * p.levels >= 1 << p.modulus_bits:
            raise SecAggAbort(
                f"client {who} refuses the secure aggregation round: {n} clients at {p.levels} levels would wrap "
                f"the {p.modulus_bits}-bit field"
            )


def _first(*values):
    return next(v for v in values if v is not None)
