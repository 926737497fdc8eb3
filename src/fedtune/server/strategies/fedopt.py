"""FedOpt: one strategy, composed of an aggregator, a server optimiser and plug-ins.

    round t:  delta  = aggregator(client deltas, weights)          mean / median / trimmed mean / krum / ...
              delta' = plug-ins rewrite it (FedEx, SVD, FLoRA, ...)   and update their own state arrays
              x      = server_optimizer.step(x, delta', moments)     sgd / momentum / adagrad / adam / yogi
              x      = plug-ins may overwrite parts of x exactly     (LoRA re-projection)

Everything that changes between rounds (optimiser moments, SCAFFOLD controls, LoRA residuals) lives in
``ServerState.arrays`` under a prefix owned by its component ("opt/", "scaffold/", "lora/"); the objects
themselves are immutable, so a checkpoint of the state resumes the run exactly.

A plug-in is the seam for anything that needs per-client payloads or individual updates: SCAFFOLD, the LoRA
modes, and (for the privacy wrapper) a fold whose ``finish`` adds noise to the aggregated delta.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedtune.aggregation.fedavg import client_weight
from fedtune.aggregation.robust import Aggregator, Mean
from fedtune.aggregation.server_opt import ServerOptimizer, ServerSGD
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec, l2_norm
from fedtune.core.state import ServerState
from fedtune.core.strategy import LINEAR, Needs, Outcome, Payload
from fedtune.core.sums import LinearSum, SumPlan
from fedtune.server.strategies.lora_wire import forget_client

OPT_PREFIX = "opt/"


class PluginFold(Protocol):
    """One round of a plug-in: sees every accepted update, then may rewrite the aggregate."""

    def add(self, update: ClientUpdate, weight: float) -> None: ...

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        """(aggregated delta to step with, state arrays to set, metrics); must not modify ``delta``."""
        ...

    def after_step(self, params: np.ndarray) -> np.ndarray:
        """The new global vector, possibly with some entries overwritten (a new array if so)."""
        ...


class Plugin(Protocol):
    name: str

    @property
    def needs(self) -> Needs:
        """What this plug-in's fold reads (``LINEAR``: nothing client-specific, only options or a fixed mask)."""
        ...

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]: ...

    def payload(self, state: ServerState, client_id: str) -> Payload: ...

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        """Arrays a client needs to evaluate the global model (e.g. LoRA residuals); usually none. With
        ``client_id``: what that client needs, given what it holds (the LoRA residual's increments)."""
        ...

    def begin(self, state: ServerState) -> PluginFold: ...


class NoFold:
    """A fold that changes nothing (for plug-ins that only send options)."""

    def add(self, update: ClientUpdate, weight: float) -> None:
        pass

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        return delta, {}, {}

    def after_step(self, params: np.ndarray) -> np.ndarray:
        return params


@dataclass(frozen=True)
class ClientOptions:
    """A plug-in that only sends fixed scalar options to every client (e.g. FedProx's mu)."""

    options: Mapping[str, Any]
    name: str = "options"
    needs: Needs = LINEAR

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        return {}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return {}, dict(self.options)

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

    def begin(self, state: ServerState) -> PluginFold:
        return NoFold()


def optimizer_slots(state: ServerState) -> dict[str, np.ndarray]:
    return {k.removeprefix(OPT_PREFIX): v for k, v in state.arrays.items() if k.startswith(OPT_PREFIX)}


@dataclass(frozen=True)
class FedOpt:
    """The composed strategy. With the defaults (mean, sgd lr=1, no plug-ins) it is FedAvg."""

    aggregator: Aggregator = field(default_factory=Mean)
    optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    weighting: str = "examples"  # "examples": w_k = n_k; "uniform": w_k = 1 (see client_weight)
    plugins: Sequence[Plugin] = ()

    @property
    def needs(self) -> Needs:
        own = Needs() if self.aggregator.linear else Needs(individual=(f"server.aggregator {self.aggregator.name!r}",))
        for plugin in self.plugins:
            own = own + plugin.needs
        return own

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        params = np.array(params, dtype=np.float32, copy=True)
        arrays = {OPT_PREFIX + k: v for k, v in self.optimizer.init(spec.numel).items()}
        for plugin in self.plugins:
            arrays.update(plugin.init_arrays(params, spec))
        return ServerState(round=0, params=params, spec=spec, arrays=arrays)

    def begin_round(self, state: ServerState, *, population: int) -> ServerState:
        return state  # nothing is accounted per round

    def should_stop(self, state: ServerState) -> str | None:
        return None

    def fit_payload(self, state: ServerState, client_id: str) -> Payload:
        arrays: dict[str, np.ndarray] = {}
        options: dict[str, Any] = {}
        for plugin in self.plugins:
            more_arrays, more_options = plugin.payload(state, client_id)
            arrays.update(more_arrays)
            options.update(more_options)
        return arrays, options

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        """What evaluating the global model needs besides ``state.params`` (see docs/STRATEGIES.md)."""
        arrays: dict[str, np.ndarray] = {}
        for plugin in self.plugins:
            arrays.update(plugin.eval_payload(state, client_id=client_id))
        return arrays

    def client_state_lost(self, state: ServerState, client_id: str) -> ServerState:
        # the only thing a plug-in assumes a client keeps is its copy of the exact LoRA modes' residual (a
        # version recorded per client, lora_wire); SCAFFOLD's c_i is kept here and sent with every fit
        return forget_client(state, client_id)

    def sum_plan(self, state: ServerState) -> SumPlan | None:
        return None  # the fold reads every update (a privacy wrapper turns a linear FedOpt into a sum strategy)

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> Outcome:
        fold = self.aggregator.fold(state.spec.numel)
        plugin_folds = [plugin.begin(state) for plugin in self.plugins]
        for update in updates:  # one at a time: a streaming aggregator keeps no update after this
            weight = client_weight(update.num_examples, self.weighting)
            fold.add(update.delta, weight)
            for plugin_fold in plugin_folds:
                plugin_fold.add(update, weight)
            del update  # not alive while the next one is produced, nor during the step
        if fold.count == 0:
            # No usable reply: keep the model and every array, still advance the round so sampling moves on.
            return state.evolve(round=state.round + 1), {"aggregated": 0}
        delta, metrics = fold.result()
        return self._step(state, delta, plugin_folds, count=fold.count, metrics=metrics)

    def apply_sum(self, state: ServerState, total: LinearSum) -> Outcome:
        """The step from the weighted mean ``total.total / total.weight`` (a linear FedOpt only)."""
        if not self.needs.linear:
            raise TypeError(f"{', '.join(self.needs.individual)} needs individual updates, not their sum")
        if total.aborted is not None or total.count == 0 or total.weight <= 0:
            return state.evolve(round=state.round + 1), {"aggregated": 0}
        return self.step_mean(state, total.total / total.weight, count=total.count)

    def step_mean(self, state: ServerState, mean: np.ndarray, *, count: int = 1) -> Outcome:
        """The server step with ``mean`` as the round's aggregated change (a linear FedOpt: its plug-ins read
        nothing client-specific, so their folds see no update). What DP-FedAvg and SecAgg step with."""
        if not self.needs.linear:
            raise TypeError(f"{', '.join(self.needs.individual)} needs individual updates, not their mean")
        delta = np.asarray(mean, dtype=np.float32)
        return self._step(state, delta, [plugin.begin(state) for plugin in self.plugins], count=count, metrics={})

    def _step(
        self, state: ServerState, delta: np.ndarray, plugin_folds: list[PluginFold], *, count: int, metrics: dict
    ) -> Outcome:
        arrays = dict(state.arrays)  # a new dict: the caller's state is never modified
        for plugin_fold in plugin_folds:
            delta, new_arrays, more = plugin_fold.finish(delta)
            arrays.update(new_arrays)
            metrics.update(more)
        params, slots = self.optimizer.step(state.params, delta, optimizer_slots(state))
        for plugin_fold in plugin_folds:
            params = plugin_fold.after_step(params)
        arrays.update({OPT_PREFIX + k: v for k, v in slots.items()})
        metrics = {"aggregated": count, "update_norm": l2_norm(delta), **metrics}
        return state.evolve(round=state.round + 1, params=params, arrays=arrays), metrics
