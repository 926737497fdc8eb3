"""SecureAggregation: a wrapper that turns any linear strategy into a sum strategy under SecAgg.

Its plan asks the loop for the round's sum of (w_k x_k, w_k), quantised into [-clip_range, clip_range]; the
loop forms it with the secure summer (the server-side protocol object learns only the survivors' sum), and
``apply_sum`` divides the two and steps the inner strategy with the mean. Under DP-FedAvg the DP wrapper plans
the sum instead, and the loop forms it with the same secure summer (fedtune.privacy.build.summer_for).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.core.strategy import Needs, Outcome, Payload
from fedtune.core.sums import LinearSum, SumPlan
from fedtune.privacy.sums import plain_sum
from fedtune.privacy.wrapping import LinearStrategy, require_linear, skip_round


class SecureAggregation:
    def __init__(self, inner: LinearStrategy, cfg: SecAggConfig, *, weighting: str) -> None:
        require_linear(inner, what="privacy.secure_aggregation")
        self.inner, self.cfg, self.weighting = inner, cfg, weighting

    @property
    def needs(self) -> Needs:
        return self.inner.needs

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        return self.inner.init_state(params, spec)

    def begin_round(self, state: ServerState, *, population: int) -> ServerState:
        return self.inner.begin_round(state, population=population)

    def should_stop(self, state: ServerState) -> str | None:
        return self.inner.should_stop(state)

    def fit_payload(self, state: ServerState, client_id: str) -> Payload:
        return self.inner.fit_payload(state, client_id)

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return self.inner.eval_payload(state, client_id=client_id)

    def client_state_lost(self, state: ServerState, client_id: str) -> ServerState:
        return self.inner.client_state_lost(state, client_id)

    def sum_plan(self, state: ServerState) -> SumPlan:
        return SumPlan(
            round=state.round + 1,
            numel=state.spec.numel,
            weighting=self.weighting,
            coord_bound=self.cfg.clip_range,
            weight_cap=self.cfg.weight_cap,
        )

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> Outcome:
        """The round from the updates summed in the clear (what the loop forms securely instead)."""
        return self.apply_sum(state, plain_sum(updates, self.sum_plan(state)))

    def apply_sum(self, state: ServerState, total: LinearSum) -> Outcome:
        if total.aborted is not None:
            return skip_round(state), {"aggregated": 0, "secagg_abort": total.aborted}
        if total.count == 0 or total.weight <= 0:
            return skip_round(state), {"aggregated": 0, **total.metrics}
        new_state, metrics = self.inner.step_mean(state, total.total / total.weight, count=total.count)
        return new_state, {**metrics, **total.metrics, "aggregated": total.count}
