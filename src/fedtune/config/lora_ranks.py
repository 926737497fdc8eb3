"""``server.lora_client_ranks``: which LoRA rank each simulated client trains at (heterogeneous ranks).

Three forms, all fixed for the whole run and drawn from the run seed where they draw:

    [4, 8, 16]                                      each client draws one of these uniformly
    {client_0: 4, client_1: 16}                     a per-client mapping (every sampled client must be named)
    {tiers: [{r: 4, fraction: 0.5}, {r: 16, fraction: 0.5}]}   resource tiers: a client draws tier i with
                                                    probability fraction_i (the fractions sum to 1)

A deployed participant trains at the rank of its own ``--config`` (``model.lora.r``) instead.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from fedtune.config.base import PositiveInt, Section


class RankTier(Section):
    r: PositiveInt  # the rank clients of this tier train at
    fraction: Annotated[float, Field(gt=0, le=1)]  # the probability that a client belongs to this tier


class RankTiers(Section):
    tiers: Annotated[list[RankTier], Field(min_length=1)]

    @model_validator(mode="after")
    def _check(self) -> RankTiers:
        total = sum(t.fraction for t in self.tiers)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"server.lora_client_ranks.tiers fractions must sum to 1, they sum to {total:g}")
        return self


# a list is a seeded uniform draw, RankTiers a seeded weighted draw, a mapping names each client's rank
ClientRanks = Annotated[list[PositiveInt], Field(min_length=1)] | RankTiers | dict[str, PositiveInt]


def largest_rank(ranks: ClientRanks) -> int:
    """The largest rank any client can be given (checked against model.lora.r)."""
    if isinstance(ranks, RankTiers):
        return max(t.r for t in ranks.tiers)
    if isinstance(ranks, dict):
        return max(ranks.values(), default=1)
    return max(ranks)
