"""Which rank each client trains at, and the options that tell it (flora / hetlora / flexlora).

The server assigns a rank per client from ``server.lora_client_ranks`` (fixed for the run, drawn from the
seed); the client receives it as option ``lora_rank`` (only when it is below the adapter's rank) together with
``lora_rslora`` (how s_k = alpha / r_k is computed), and trains a rank-r_k adapter
(``fedtune.client.lora_ranks``). Its reply comes back in global units, zero beyond r_k
(``fedtune.aggregation.lora_ranks``), so the server folds need no rank to be exact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.aggregation.lora import lora_pairs
from fedtune.config.lora_ranks import ClientRanks, RankTiers
from fedtune.core.keys import CLIENT_RANK_EXTRA, CLIENT_RSLORA_EXTRA, RANK_OPTION, RSLORA_OPTION
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.rng import derive_rng
from fedtune.core.state import ServerState
from fedtune.core.strategy import LINEAR, Needs, Payload
from fedtune.server.strategies.fedopt import NoFold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankAssignment:
    """A pure function of (seed, client id): every client's rank, the same in every round and on resume."""

    seed: int = 0
    choices: tuple[int, ...] = ()  # a seeded draw from these ...
    probabilities: tuple[float, ...] = ()  # ... with these probabilities (empty: uniform)
    mapping: Mapping[str, int] = field(default_factory=dict)  # or each client named
    rslora: bool = False

    @classmethod
    def from_config(cls, ranks: ClientRanks | None, *, seed: int, rslora: bool) -> RankAssignment:
        if ranks is None:
            return cls(seed=seed, rslora=rslora)
        if isinstance(ranks, RankTiers):
            return cls(
                seed=seed,
                choices=tuple(t.r for t in ranks.tiers),
                probabilities=tuple(t.fraction for t in ranks.tiers),
                rslora=rslora,
            )
        if isinstance(ranks, dict):
            return cls(seed=seed, mapping=dict(ranks), rslora=rslora)
        return cls(seed=seed, choices=tuple(ranks), rslora=rslora)

    @property
    def heterogeneous(self) -> bool:
        return bool(self.choices or self.mapping)

    def largest(self) -> int | None:
        ranks = list(self.choices) + list(self.mapping.values())
        return max(ranks) if ranks else None

    def rank(self, client_id: str, full_rank: int) -> int:
        """This client's rank (at most ``full_rank``); the full rank when no ranks are configured."""
        if self.mapping:
            if client_id not in self.mapping:
                raise ValueError(
                    f"server.lora_client_ranks names no rank for client {client_id!r} "
                    f"(it names {', '.join(sorted(self.mapping)[:5])}...)"
                )
            return min(self.mapping[client_id], full_rank)
        if not self.choices:
            return full_rank
        rng = derive_rng(self.seed, "lora-rank", client_id)
        if self.probabilities:
            draw = rng.choice(len(self.choices), p=list(self.probabilities))
        else:  # the draw FLoRA has always made from a list, so earlier runs keep their ranks
            draw = rng.integers(len(self.choices))
        return min(int(self.choices[int(draw)]), full_rank)

    def options(self, client_id: str, full_rank: int) -> dict[str, Any]:
        """What a client needs to train at its rank (nothing when it trains the full rank)."""
        rank = self.rank(client_id, full_rank)
        return {RANK_OPTION: rank, RSLORA_OPTION: self.rslora} if rank < full_rank else {}

    def reply_rank(self, update: ClientUpdate, full_rank: int) -> int:
        """The rank a reply counts at: the one it announces (metric ``lora_rank``; a deployed participant may
        train below its assigned rank), never above the assigned one. The folds use only that many components
        of the reply: whatever it holds beyond them (a client that did not mask, or a reply the server's
        update-norm bound scaled, which moves the zero padding) is dropped."""
        assigned = self.rank(update.client_id, full_rank)
        announced = update.metrics.get("lora_rank")
        if announced is None:
            return assigned
        rank = int(announced)
        if not 0 < rank <= assigned:
            log.warning(
                "client %s announces LoRA rank %s, its rank is at most %d: counted at %d",
                update.client_id, announced, assigned, assigned,
            )  # fmt: skip
            return assigned
        return rank


# ------------------------------------------------------------------------------ ranks a client lowered itself
# HetLoRA's self-pruning (fedtune.server.strategies.hetlora): each client's current rank and its tail norm at
# its last fit, kept in the server state (so they survive resume) as a float64 (2,) array [rank, norm] under
# this prefix + the client id; norm -1 (a norm is never negative; the state's arrays must be finite): nothing
# to compare the next fit with (none yet, or it just pruned).
PRUNED_PREFIX = "hetlora/client/"


@dataclass(frozen=True)
class RankRecord:
    rank: int
    previous_norm: float | None

    def array(self) -> np.ndarray:
        return np.array([self.rank, -1.0 if self.previous_norm is None else self.previous_norm], np.float64)


def rank_record(state: ServerState, client_id: str) -> RankRecord | None:
    arr = state.arrays.get(PRUNED_PREFIX + client_id)
    if arr is None:
        return None
    norm = float(arr[1])
    return RankRecord(int(arr[0]), None if norm < 0 else norm)


def current_rank(ranks: RankAssignment, state: ServerState, client_id: str, full_rank: int) -> int:
    """min(assigned, the rank the client pruned itself to): what it trains (and fine-tunes) at now."""
    assigned = ranks.rank(client_id, full_rank)
    record = rank_record(state, client_id)
    return assigned if record is None else min(assigned, record.rank)


@dataclass(frozen=True)
class ClientRankExtras:
    """Tells each evaluated client its current rank (``lora/client_rank``, ``lora/client_rslora``), so that
    personalization.finetune_steps fine-tunes at that rank after the last round. Composed beside the rank mode
    (flora / hetlora / flexlora) only when fine-tuning is on: it sends nothing with fits and folds nothing."""

    ranks: RankAssignment
    name: str = "client-rank"

    @property
    def needs(self) -> Needs:
        return LINEAR

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        return {}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return {}, {}

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        if client_id is None:  # the global model (server-side evaluation, export): no client's rank
            return {}
        full = max(p.rank for p in lora_pairs(state.spec))
        rank = current_rank(self.ranks, state, client_id, full)
        return {
            CLIENT_RANK_EXTRA: np.array([rank], np.int64),
            CLIENT_RSLORA_EXTRA: np.array([int(self.ranks.rslora)], np.int64),
        }

    def begin(self, state: ServerState) -> NoFold:
        return NoFold()
