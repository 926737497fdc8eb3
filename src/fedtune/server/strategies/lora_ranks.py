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

from fedtune.config.lora_ranks import ClientRanks, RankTiers
from fedtune.core.keys import RANK_OPTION, RSLORA_OPTION
from fedtune.core.messages import ClientUpdate
from fedtune.core.rng import derive_rng

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
