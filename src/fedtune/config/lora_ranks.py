"""``server.lora_client_ranks``: which LoRA rank each simulated client trains at (heterogeneous ranks).

Three forms, all fixed for the whole run and drawn from the run seed where they draw:

    [4, 8, 16]                                      each client draws one of these uniformly
    {client_0: 4, client_1: 16}                     a per-client mapping (every sampled client must be named)
    {tiers: [{r: 4, fraction: 0.5}, {r: 16, fraction: 0.5}]}   resource tiers: a client draws tier i with
                                                    probability fraction_i (the fractions sum to 1)

A deployed participant trains at the rank of its own ``--config`` (``model.lora.r``) instead.

``server.hetlora`` (lora_aggregation hetlora only; absent: plain zero-padding, as before) turns on the two
mechanisms of HetLoRA (Cho et al. 2024) beyond zero-padding, each on its own:

    hetlora:
      prune_gamma: 0.75       # local rank self-pruning: the decay factor gamma (0 < gamma < 1)
      prune_lambda: 0.01      # its regulariser's weight lambda (0: no regulariser, the rule alone)
      aggregation: sparsity   # weight each padded reply by ||B_k A_k||_F / Z instead of its examples

See ``fedtune.server.strategies.hetlora`` for the equations.
"""

from __future__ import annotations

from typing import Annotated, Literal

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


class HetLoraConfig(Section):
    """``server.hetlora``: HetLoRA's rank self-pruning and sparsity-weighted aggregation (both off by default)."""

    # self-pruning: after its local training a client of rank r_k measures its last components
    # P_k = sum_layers ||B_k[:, g:r_k]||_F ||A_k[g:r_k]||_F, g = floor(gamma r_k); when P_k is smaller than at its
    # previous fit at that rank, it trains at rank max(1, g) from then on. None: no pruning.
    prune_gamma: Annotated[float, Field(gt=0, lt=1)] | None = None
    # with prune_gamma: lambda P_k is added to every local step's loss (the paper's regulariser, which drives
    # the last components toward zero so that the rule prunes them); 0: the rule alone
    prune_lambda: Annotated[float, Field(ge=0)] = 0.0
    # examples: the zero-padded replies are averaged with the usual data weights (FedAvg, as without this
    # section); sparsity: each with weight ||B~_k A~_k||_F / Z, Z the sum over the round's replies
    aggregation: Literal["examples", "sparsity"] = "examples"

    @model_validator(mode="after")
    def _check(self) -> HetLoraConfig:
        if self.prune_lambda and self.prune_gamma is None:
            raise ValueError("server.hetlora.prune_lambda is the self-pruning regulariser: it needs prune_gamma")
        return self

    @property
    def prunes(self) -> bool:
        return self.prune_gamma is not None


# a list is a seeded uniform draw, RankTiers a seeded weighted draw, a mapping names each client's rank
ClientRanks = Annotated[list[PositiveInt], Field(min_length=1)] | RankTiers | dict[str, PositiveInt]


def largest_rank(ranks: ClientRanks) -> int:
    """The largest rank any client can be given (checked against model.lora.r)."""
    if isinstance(ranks, RankTiers):
        return max(t.r for t in ranks.tiers)
    if isinstance(ranks, dict):
        return max(ranks.values(), default=1)
    return max(ranks)
