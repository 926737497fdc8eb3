"""The FedBuff server: a Strategy (``fedtune.core.strategy``) whose round is one buffered step.

It is a sum strategy: ``sum_plan`` asks the loop for the buffer's sum with every summand discounted by its
staleness (``SumPlan.staleness``; the loop forms it with the same summer as a synchronous round, in the clear),
and ``apply_sum`` takes the step with the same FedOpt step a synchronous round takes (``FedOpt.step_mean``):
one contract, one weighted fold and one server-optimiser step for both modes.

    step t:  d = sum_k s(tau_k) w_k delta_k / sum_k w_k          (aggregation.fedbuff, the paper's normalisation)
             x = server_optimizer.step(x, d, moments)             sgd (FedAvg) / momentum / adagrad / adam / yogi

With ``privacy.dp`` (DP-FedAvg's clip and noise, per buffered step; weights are uniform under DP):

             d = (sum_k s(tau_k) clip(delta_k, C) + N(0, (z C)^2 I)) / K

K is the configured buffer size, public and fixed, so failed arrivals only shrink the step. Accounting, and
why it is conservative: the schedule (who arrives when, hence every s(tau_k)) is a function of the seed and
config only, never of the data, and a client is never in flight twice nor twice in one buffer (server.clock),
so one client's data moves the noised sum of a step by at most 2C under replace-one adjacency (s <= 1). Each
step is therefore a Gaussian mechanism of multiplier z / 2 relative to that sensitivity, composed over the
steps taken with NO amplification by sampling (arrivals are not Poisson-sampled): the ledger charges every
client every step, whether it took part or not. That is dp-accounting's GaussianDpEvent self-composed T times
(``accountant.gaussian_replace_entry``), the same entry local DP-SGD over shuffled minibatches uses.

Everything that changes lives in the state: optimiser moments under ``opt/`` (as FedOpt keeps them) and the DP
ledger under ``extra["dp"]``; the objects are immutable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedtune.aggregation.fedbuff import StalenessWeight
from fedtune.aggregation.server_opt import ServerOptimizer, ServerSGD
from fedtune.config.privacy import DPConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.core.strategy import LINEAR, Needs, Outcome, Payload
from fedtune.core.sums import LinearSum, Staleness, SumPlan
from fedtune.privacy import accountant
from fedtune.privacy.noise import gaussian
from fedtune.privacy.sums import plain_sum
from fedtune.server.strategies.fedopt import FedOpt

DP_KEY = "dp"


@dataclass(frozen=True)
class Arrival:
    """An accepted update and its staleness (server version at the step - version it trained on)."""

    update: ClientUpdate
    staleness: int


@dataclass(frozen=True)
class FedBuff:
    optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    staleness: StalenessWeight = field(default_factory=StalenessWeight)
    buffer_size: int = 4  # K: the public denominator under DP
    weighting: str = "examples"  # "examples": w_k = n_k; "uniform": w_k = 1
    client_options: Mapping[str, Any] = field(default_factory=dict)  # sent with every dispatch (FedProx mu)
    dp: DPConfig | None = None
    seed: int = 0

    @property
    def needs(self) -> Needs:
        return LINEAR  # the step reads the buffer's discounted sum only

    @property
    def stepper(self) -> FedOpt:
        """The server-optimiser step a synchronous FedAvg/FedOpt round takes (mean aggregator, no plug-ins)."""
        return FedOpt(optimizer=self.optimizer, weighting=self.weighting)

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        state = self.stepper.init_state(params, spec)
        return state.evolve(extra={DP_KEY: {"ledger": []}}) if self.dp is not None else state

    def begin_round(self, state: ServerState, *, population: int) -> ServerState:
        return state  # nothing depends on the population: arrivals are not sampled

    def fit_payload(self, state: ServerState, client_id: str) -> Payload:
        """(arrays, scalar options) sent with a dispatch, as the synchronous Strategy's ``fit_payload``."""
        dp = {"dp_clip": self.dp.clip, "dp_adaptive": False} if self.dp is not None else {}
        return {}, {**self.client_options, **dp}

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

    def client_state_lost(self, state: ServerState, client_id: str) -> ServerState:
        return state  # it assumes nothing of its clients (the exact LoRA modes are synchronous only)

    def epsilon(self, state: ServerState) -> float:
        if self.dp is None:
            return 0.0
        return accountant.epsilon(state.extra[DP_KEY]["ledger"], self.dp.delta, accountant=self.dp.accountant)

    def should_stop(self, state: ServerState) -> str | None:
        """The DP budget: stop before a step that would spend more than ``privacy.dp.epsilon_budget``."""
        if self.dp is None or self.dp.epsilon_budget is None:
            return None
        ledger = accountant.append(state.extra[DP_KEY]["ledger"], self._entry())
        eps = accountant.epsilon(ledger, self.dp.delta, accountant=self.dp.accountant)
        if eps > self.dp.epsilon_budget:
            return f"the next step would spend epsilon {eps:.3f} > privacy.dp.epsilon_budget {self.dp.epsilon_budget}"
        return None

    def _entry(self) -> dict:
        assert self.dp is not None and self.dp.noise_multiplier is not None  # async refuses target_epsilon
        return accountant.gaussian_replace_entry(self.dp.noise_multiplier)

    def sum_plan(self, state: ServerState) -> SumPlan:
        """The buffer's sum: sum_k s(tau_k) w_k clip(delta_k) over sum_k w_k, tau_k = state.round - v_k."""
        clip = self.dp.clip if self.dp is not None else None
        return SumPlan(
            round=state.round + 1,
            numel=state.spec.numel,
            weighting=self.weighting,
            l2_bound=clip,
            coord_bound=clip or 1.0,
            staleness=Staleness(version=state.round, weight=self.staleness),
        )

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> Outcome:
        """The step from the buffer's updates summed in the clear (what the loop forms itself)."""
        return self.apply_sum(state, plain_sum(updates, self.sum_plan(state)))

    def apply_sum(self, state: ServerState, total: LinearSum) -> Outcome:
        """One buffered step from the discounted sum; ``state.round`` counts steps."""
        if self.dp is not None:  # charged whatever arrived: the noised sum is released anyway
            direction, metrics, extra = self._private(state, total)
            new, more = self.stepper.step_mean(state.evolve(extra=extra), direction, count=total.count)
            return new, {**more, **metrics, **total.metrics, "aggregated": total.count}
        if total.count == 0 or total.weight <= 0:  # nothing usable arrived: keep the model, still count the step
            return state.evolve(round=state.round + 1), {"aggregated": 0}
        direction = (total.total / total.weight).astype(np.float32)  # the paper's normalisation: sum w_k
        new, more = self.stepper.step_mean(state, direction, count=total.count)
        return new, {**more, **total.metrics}

    def step(self, state: ServerState, arrivals: Iterable[Arrival]) -> Outcome:
        """One buffered step from (update, staleness) pairs, folded in the order given: ``aggregate`` over the
        updates stamped with the version they trained on (what the async loop hands the summer)."""
        staleness: list[int] = []

        def stamped() -> Iterable[ClientUpdate]:
            for arrival in arrivals:
                staleness.append(arrival.staleness)
                yield replace(arrival.update, version=state.round - arrival.staleness)

        new, metrics = self.aggregate(state, stamped())
        return new, {**metrics, **staleness_metrics(staleness)}

    def _private(self, state: ServerState, total: LinearSum) -> tuple[np.ndarray, dict, dict]:
        """(noised step, metrics, new extra): (sum_k s_k clip(delta_k) + N(0, (zC)^2)) / K, K public."""
        assert self.dp is not None and self.dp.noise_multiplier is not None
        z, clip, step_idx = self.dp.noise_multiplier, self.dp.clip, state.round + 1
        ledger = accountant.append(state.extra[DP_KEY]["ledger"], self._entry())
        noise = gaussian(
            state.spec.numel, z * clip, seed=self.seed, scope=("fedbuff-dp-noise", step_idx), secure=self.dp.secure_rng
        )
        direction = ((total.total + noise) / self.buffer_size).astype(np.float32)
        metrics = {
            "epsilon": accountant.epsilon(ledger, self.dp.delta, accountant=self.dp.accountant),
            "dp_delta": self.dp.delta,
            "dp_noise_multiplier": z,
            "dp_clip": clip,
            "dp_noise_std": z * clip,
        }
        return direction, metrics, {**state.extra, DP_KEY: {**state.extra[DP_KEY], "ledger": ledger}}


def staleness_metrics(staleness: list[int]) -> dict[str, Any]:
    """The buffer's mean and largest staleness (none: no metrics)."""
    return {"staleness_mean": float(np.mean(staleness)), "staleness_max": max(staleness)} if staleness else {}
