"""The FedBuff server: one buffered step as a state transition, ``step(state, arrivals) -> (state, metrics)``.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedtune.aggregation.clip import clip_l2
from fedtune.aggregation.fedbuff import BufferFold, StalenessWeight
from fedtune.aggregation.server_opt import ServerOptimizer, ServerSGD
from fedtune.config.privacy import DPConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.privacy import accountant
from fedtune.privacy.noise import gaussian
from fedtune.server.strategies.fedopt import OPT_PREFIX, optimizer_slots

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

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        params = np.array(params, dtype=np.float32, copy=True)
        arrays = {OPT_PREFIX + k: v for k, v in self.optimizer.init(spec.numel).items()}
        extra = {DP_KEY: {"ledger": []}} if self.dp is not None else {}
        return ServerState(round=0, params=params, spec=spec, arrays=arrays, extra=extra)

    def fit_payload(self, state: ServerState, client_id: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, scalar options) sent with a dispatch, as the synchronous Strategy's ``fit_payload``."""
        dp = {"dp_clip": self.dp.clip, "dp_adaptive": False} if self.dp is not None else {}
        return {}, {**self.client_options, **dp}

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

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

    def step(self, state: ServerState, arrivals: Iterable[Arrival]) -> tuple[ServerState, dict]:
        """One buffered step from the arrivals (folded in the order given); ``state.round`` counts steps."""
        fold = BufferFold(state.spec.numel)
        staleness: list[int] = []
        for arrival in arrivals:
            delta, weight = arrival.update.delta, self._weight(arrival.update)
            if self.dp is not None:
                delta, _ = clip_l2(delta, self.dp.clip)
            fold.add(delta, weight=weight, staleness_weight=self.staleness(arrival.staleness))
            staleness.append(arrival.staleness)
            del arrival, delta  # no update is kept after it is folded
        metrics: dict[str, Any] = {"aggregated": fold.count}
        if staleness:
            metrics.update(staleness_mean=float(np.mean(staleness)), staleness_max=max(staleness))
        if self.dp is not None:
            direction, dp_metrics, extra = self._private(state, fold)
            metrics.update(dp_metrics)
        elif fold.count == 0:  # nothing usable arrived: keep the model, still count the step
            return state.evolve(round=state.round + 1), metrics
        else:
            direction, extra = fold.result(), state.extra
        params, slots = self.optimizer.step(state.params, direction, optimizer_slots(state))
        arrays = {**state.arrays, **{OPT_PREFIX + k: v for k, v in slots.items()}}
        metrics["update_norm"] = float(np.linalg.norm(direction))
        return state.evolve(round=state.round + 1, params=params, arrays=arrays, extra=extra), metrics

    def _weight(self, update: ClientUpdate) -> float:
        return float(update.num_examples) if self.weighting == "examples" else 1.0

    def _private(self, state: ServerState, fold: BufferFold) -> tuple[np.ndarray, dict, dict]:
        """(noised step, metrics, new extra): the step is charged to the ledger whatever arrived."""
        assert self.dp is not None and self.dp.noise_multiplier is not None
        z, clip, step_idx = self.dp.noise_multiplier, self.dp.clip, state.round + 1
        ledger = accountant.append(state.extra[DP_KEY]["ledger"], self._entry())
        noise = gaussian(
            state.spec.numel, z * clip, seed=self.seed, scope=("fedbuff-dp-noise", step_idx), secure=self.dp.secure_rng
        )
        direction = ((fold.weighted_sum() + noise) / self.buffer_size).astype(np.float32)
        metrics = {
            "epsilon": accountant.epsilon(ledger, self.dp.delta, accountant=self.dp.accountant),
            "dp_delta": self.dp.delta,
            "dp_noise_multiplier": z,
            "dp_clip": clip,
            "dp_noise_std": z * clip,
        }
        return direction, metrics, {**state.extra, DP_KEY: {**state.extra[DP_KEY], "ledger": ledger}}
