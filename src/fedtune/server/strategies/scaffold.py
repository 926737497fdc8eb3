"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift.

Server control c and every client's control c_i live in the server state, because simulated clients are
stateless workers (a deployed client could keep its own c_i; the server copy makes resume exact either
way). Keys: ``scaffold/sum`` = sum_i c_i over all clients, and ``scaffold/c/<client id>`` = c_i.

    server sends   c = sum_i c_i / N  and  c_i   (FitInstruction.extras "scaffold/c", "scaffold/c_i")
    client         g <- g - c_i + c at every local step; after K steps with learning rate lr it returns
                   dc_i = c_i+ - c_i = -c - delta / (K lr)    (option II; ClientUpdate.extras "scaffold/dc")
    server         c_i <- c_i + dc_i;  sum <- sum + sum_{i in S} dc_i, i.e. c <- c + (1/N) sum_{i in S} dc_i

N is the population size when known (``num_clients``); without it, N is the number of clients that have
reported so far, which equals the paper's c once every client has taken part (docs/STRATEGIES.md).
Memory: one model-sized vector per client that has ever taken part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.core.keys import C_KEY, CI_KEY, DC_KEY
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.core.strategy import Needs, Payload
from fedtune.server.strategies.fedopt import PluginFold

SUM_KEY = "scaffold/sum"
CLIENT_PREFIX = "scaffold/c/"


def client_key(client_id: str) -> str:
    return CLIENT_PREFIX + client_id


def known_clients(arrays: dict[str, np.ndarray]) -> int:
    return sum(1 for k in arrays if k.startswith(CLIENT_PREFIX))


@dataclass(frozen=True)
class Scaffold:
    num_clients: int | None = None  # N; None: the clients seen so far
    name: str = "scaffold"

    @property
    def needs(self) -> Needs:
        return Needs(individual=(f"the {self.name!r} plug-in",), extras=(DC_KEY,))  # each client's own control

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        return {SUM_KEY: np.zeros(spec.numel, np.float32)}

    def server_control(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        n = self.num_clients or max(1, known_clients(arrays))
        return (arrays[SUM_KEY].astype(np.float64) / n).astype(np.float32)

    def payload(self, state: ServerState, client_id: str) -> Payload:
        c_i = state.arrays.get(client_key(client_id))
        if c_i is None:
            c_i = np.zeros(state.spec.numel, np.float32)
        return {C_KEY: self.server_control(state.arrays), CI_KEY: c_i}, {}

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

    def begin(self, state: ServerState) -> PluginFold:
        return _ScaffoldFold(self, state)


@dataclass
class _ScaffoldFold:
    plugin: Scaffold
    state: ServerState
    controls: dict[str, np.ndarray] = field(default_factory=dict)
    total: np.ndarray | None = None
    missing: int = 0

    def add(self, update: ClientUpdate, weight: float) -> None:
        dc = update.extras.get(DC_KEY)
        numel = self.state.spec.numel
        if dc is None or dc.shape != (numel,) or not np.isfinite(dc).all():
            self.missing += 1  # the model update still counts; its control is left unchanged
            return
        old = self.state.arrays.get(client_key(update.client_id))
        old = np.zeros(numel, np.float64) if old is None else old.astype(np.float64)
        self.controls[client_key(update.client_id)] = (old + dc).astype(np.float32)
        self.total = dc.astype(np.float64) if self.total is None else self.total + dc

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        arrays = dict(self.controls)
        if self.total is not None:
            arrays[SUM_KEY] = (self.state.arrays[SUM_KEY].astype(np.float64) + self.total).astype(np.float32)
        c = self.plugin.server_control({**self.state.arrays, **arrays})
        return delta, arrays, {"scaffold_c_norm": float(np.linalg.norm(c)), "scaffold_missing": self.missing}

    def after_step(self, params: np.ndarray) -> np.ndarray:
        return params
