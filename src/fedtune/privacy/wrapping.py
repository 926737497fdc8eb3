"""What privacy wrappers share: the linearity check and the inner strategy they step.

A linear strategy (FedOpt with the mean aggregator, any server optimiser and plug-ins that declare
themselves linear) computes ``x <- optimiser(x, sum_k w_k d_k / sum_k w_k)``; its ``step_mean`` takes that
mean directly. A wrapper (DP-FedAvg, secure aggregation) turns it into a sum strategy: it plans the round's
sum, the loop forms it, and the wrapper steps the inner strategy with the (noised, or securely summed) mean.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fedtune.core.state import ServerState
from fedtune.core.strategy import Outcome, Strategy
from fedtune.errors import ConfigError


class LinearStrategy(Strategy, Protocol):
    """A strategy that can step with the round's mean change (FedOpt, when ``needs.linear``)."""

    def step_mean(self, state: ServerState, mean: np.ndarray, *, count: int = 1) -> Outcome: ...


def nonlinear_parts(strategy: Strategy) -> list[str]:
    """What in ``strategy`` needs individual client updates, as its parts declare (empty: it is linear)."""
    return list(strategy.needs.individual)


def require_linear(strategy: Strategy, *, what: str) -> None:
    parts = nonlinear_parts(strategy)
    if parts:
        raise ConfigError(
            f"{what} only sees the sum of the clients' updates, but {', '.join(parts)} needs individual "
            "updates; use server.aggregator 'mean' without scaffold or lora_aggregation fedex/svd/flora"
        )


def skip_round(state: ServerState) -> ServerState:
    """Keep the model, advance the round (so sampling moves on)."""
    return state.evolve(round=state.round + 1)
