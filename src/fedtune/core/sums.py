"""What a linear strategy asks of a round (``SumPlan``) and what it gets back (``LinearSum``).

The round loop forms the sum (``fedtune.privacy.sums.plain_sum`` in the clear, or secure aggregation when the
config asks for it and the transport can carry it) and hands the result to the strategy's ``apply_sum``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Staleness:
    """FedBuff's discount (Nguyen et al. 2022): a summand trained on model version v, summed for a server at
    version ``version``, is multiplied by ``weight(version - v)`` in (0, 1] after any clipping; its weight in
    the denominator is not, so a stale buffer moves the model less (``fedtune.aggregation.fedbuff``)."""

    version: int  # the server's model version the sum is for
    weight: Callable[[int], float]  # s(tau), e.g. fedtune.aggregation.fedbuff.StalenessWeight

    def of(self, client_id: str, trained_on: int | None) -> float:
        if trained_on is None:
            raise ValueError(f"the update from {client_id} does not say which model version it trained on")
        return self.weight(self.version - trained_on)


@dataclass(frozen=True)
class SumPlan:
    """What to sum in one round, and under which bounds."""

    round: int
    numel: int
    weighting: str = "uniform"  # "uniform": w_k = 1; "examples": w_k from the client's example count
    l2_bound: float | None = None  # DP's C: every summand has L2 norm <= C (enforced)
    coord_bound: float = 1.0  # SecAgg quantisation range [-b, b] per coordinate (C under DP)
    channels: tuple[str, ...] = ()  # per-client scalars in [0, 1], read from update.extras, summed too
    weight_cap: int = 1000  # SecAgg example weighting: w_k = min(n_k, cap) / cap
    # distributed DP: the clients send noised integers (fedtune.privacy.distributed), decoded with this plan
    integers: Any = None  # a distributed.SkellamPlan, or None
    # async mode: each summand discounted by its staleness (x_k -> s_k x_k; the weights w_k unchanged)
    staleness: Staleness | None = None


@dataclass(frozen=True)
class LinearSum:
    total: np.ndarray  # float64, sum_k w_k x_k
    weight: float  # sum_k w_k
    count: int  # clients in the sum
    channels: dict[str, float] = field(default_factory=dict)  # sum_k of each channel
    metrics: dict[str, Any] = field(default_factory=dict)  # how the sum was formed (re-clips, SecAgg stats)
    aborted: str | None = None  # why the sum could not be formed (a SecAgg abort); then total is zeros, count 0

    @classmethod
    def abort(cls, plan: SumPlan, reason: str) -> LinearSum:
        """The outcome of a round whose sum could not be formed (the strategy keeps its model)."""
        return cls(np.zeros(plan.numel), 0.0, 0, dict.fromkeys(plan.channels, 0.0), aborted=reason)
