"""SecureAggregation: a wrapper that makes any linear strategy aggregate through SecAgg.

The server-side protocol object learns only the sum of the survivors' quantised (w_k x_k, w_k); the
wrapper divides the two and hands the mean to the inner strategy as its one update. Under DP-FedAvg the
DP wrapper uses the same secure summer instead (fedtune.privacy.build decides).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.sums import Summer, SumPlan
from fedtune.privacy.wrapping import (
    forward_begin_round,
    forward_eval_payload,
    forward_should_stop,
    inner_step,
    require_linear,
    skip_round,
)


class SecureAggregation:
    def __init__(self, inner: Any, cfg: SecAggConfig, *, weighting: str, summer: Summer) -> None:
        require_linear(inner, what="privacy.secure_aggregation")
        self.inner, self.cfg, self.weighting, self.summer = inner, cfg, weighting, summer

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        return self.inner.init_state(params, spec)

    def begin_round(self, state: ServerState, *, population: int) -> ServerState:
        return forward_begin_round(self.inner, state, population)

    def should_stop(self, state: ServerState) -> str | None:
        return forward_should_stop(self.inner, state)

    def fit_payload(self, state: ServerState, client_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self.inner.fit_payload(state, client_id)

    def eval_payload(self, state: ServerState) -> dict[str, np.ndarray]:
        return forward_eval_payload(self.inner, state)

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, dict]:
        plan = SumPlan(
            round=state.round + 1,
            numel=state.spec.numel,
            weighting=self.weighting,
            coord_bound=self.cfg.clip_range,
            weight_cap=self.cfg.weight_cap,
        )
        try:
            total = self.summer(updates, plan)
        except SecAggAbort as err:
            return skip_round(state), {"aggregated": 0, "secagg_abort": str(err)}
        if total.count == 0 or total.weight <= 0:
            return skip_round(state), {"aggregated": 0, **total.metrics}
        new_state, metrics = inner_step(self.inner, state, total.total / total.weight)
        return new_state, {**metrics, **total.metrics, "aggregated": total.count}
