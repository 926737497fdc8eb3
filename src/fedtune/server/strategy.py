"""Strategies are state transitions: ``aggregate(state, updates) -> (state, metrics)``.

A strategy keeps nothing on ``self`` that changes between rounds; everything lives in ServerState, so a
checkpoint of the state is enough to resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from fedtune.aggregation.fedavg import WeightedMean
from fedtune.config.schema import ServerConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec, l2_norm
from fedtune.core.state import ServerState


class Strategy(Protocol):
    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState: ...

    def fit_payload(self, state: ServerState, client_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, scalar options) sent to one sampled client alongside the global vector."""
        ...

    def eval_payload(self, state: ServerState) -> dict[str, np.ndarray]:
        """Arrays that, with ``state.params``, make up the global model (EvalInstruction.extras); often none."""
        ...

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, dict]: ...


class FedAvg:
    """global <- global + eta * sum_k w_k delta_k / sum_k w_k, with w_k = n_k (or 1 for uniform)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        return ServerState(round=0, params=params.astype(np.float32, copy=True), spec=spec)

    def fit_payload(self, state: ServerState, client_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {}

    def eval_payload(self, state: ServerState) -> dict[str, np.ndarray]:
        return {}

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, dict]:
        mean = WeightedMean(state.spec.numel)
        for update in updates:
            weight = float(update.num_examples) if self.cfg.weighting == "examples" else 1.0
            mean.add(update.delta, weight)
        if mean.count == 0:
            # No usable reply: keep the model, still advance the round so sampling moves on.
            return state.evolve(round=state.round + 1), {"aggregated": 0}
        step = mean.result()
        params = state.params + np.float32(self.cfg.lr) * step
        metrics = {"aggregated": mean.count, "update_norm": l2_norm(step)}
        return state.evolve(round=state.round + 1, params=params.astype(np.float32)), metrics
