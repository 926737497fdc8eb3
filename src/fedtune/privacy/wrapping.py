"""What privacy wrappers share: the linearity check, forwarding optional strategy hooks, and the
synthetic single update through which a wrapper hands its (noised, or securely summed) mean to the inner
strategy.

A linear strategy (FedAvg, FedOpt with the mean aggregator and any server optimiser) computes
``x <- optimiser(x, sum_k w_k d_k / sum_k w_k)``. Given a single update whose delta is the mean, its
aggregate is exactly that step, so a wrapper can replace "the clients' updates" by "their mean" without
knowing the inner strategy's internals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from fedtune.core.messages import ClientUpdate
from fedtune.core.state import ServerState
from fedtune.core.strategy import Strategy
from fedtune.errors import ConfigError

AGGREGATE_ID = "aggregate"  # client id of the synthetic mean update


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


def mean_update(state: ServerState, mean: np.ndarray) -> ClientUpdate:
    """One synthetic update carrying the round's mean change (weight 1, uniform or not)."""
    return ClientUpdate(
        client_id=AGGREGATE_ID,
        round=state.round + 1,
        num_examples=1,
        delta=np.asarray(mean, dtype=np.float32),
        spec_digest=state.spec.digest,
    )


def inner_step(inner: Any, state: ServerState, mean: np.ndarray) -> tuple[ServerState, dict]:
    """The inner strategy's aggregate applied to the mean as its only update."""
    return inner.aggregate(state, [mean_update(state, mean)])


def skip_round(state: ServerState) -> ServerState:
    """Keep the model, advance the round (so sampling moves on)."""
    return state.evolve(round=state.round + 1)


def forward_begin_round(inner: Any, state: ServerState, population: int) -> ServerState:
    begin = getattr(inner, "begin_round", None)
    return begin(state, population=population) if begin is not None else state


def forward_should_stop(inner: Any, state: ServerState) -> str | None:
    stop = getattr(inner, "should_stop", None)
    return stop(state) if stop is not None else None


def forward_eval_payload(inner: Any, state: ServerState) -> dict[str, np.ndarray]:
    payload = getattr(inner, "eval_payload", None)
    return payload(state) if payload is not None else {}


def drain(updates: Iterable[ClientUpdate]) -> None:
    """Consume an update stream (the loop records replies as they are pulled)."""
    for _ in updates:
        pass
