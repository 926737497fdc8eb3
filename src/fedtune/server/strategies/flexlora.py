"""FlexLoRA (Bai et al. 2024): heterogeneous ranks, exact average of the full products, SVD per client.

Each round the server forms the exact weighted mean of the clients' weight changes

    P = sum_k p_k B~_k A~_k          (replies in global units: s P = sum_k p_k s_k B_k A_k)

and the global model is exactly W0 + s P. P is stored as its best rank-r factors (B, A) = SVD_r(P), balanced
(B = U sqrt(S), A = sqrt(S) V^T) and sorted by singular value, plus the residual R = P - B A (replaced every
round, not accumulated: P already contains everything the clients started from). Because truncating an SVD
is nested, the first r_k components of (B, A) are SVD_{r_k}(P): client k starts from its best rank-r_k
approximation of the global change, as in the paper, simply by truncating the vector it receives
(``fedtune.aggregation.lora_ranks.to_client_rank``).

Downlink: fits carry only the adapter vector (a client starts from SVD_{r_k}(P), which needs no R);
evaluation and export carry R (``eval_payload``), so they see exactly W0 + s P.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.aggregation.lora import LoraPair, lora_pairs, svd_reproject, truncate_rank
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.server.strategies.fedopt import NoFold, Payload, PluginFold
from fedtune.server.strategies.lora import _ResidualMode, check_ranks, full_rank, residual_key
from fedtune.server.strategies.lora_ranks import RankAssignment


@dataclass(frozen=True)
class FlexLora(_ResidualMode):
    ranks: RankAssignment = field(default_factory=RankAssignment)
    name: str = "flexlora"

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        arrays = super().init_arrays(params, spec)
        check_ranks(self.ranks, spec)
        return arrays

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return {}, self.ranks.options(client_id, full_rank(state.spec))

    def begin(self, state: ServerState) -> PluginFold:
        return _FlexFold(state, self.ranks)


@dataclass
class _FlexFold(NoFold):
    """Per module: sum_k w_k B~_k A~_k; finish re-factorises the mean and keeps the rest as the residual."""

    state: ServerState
    ranks: RankAssignment
    pairs: list[LoraPair] = field(init=False)
    total: float = 0.0
    products: dict[str, np.ndarray] = field(default_factory=dict)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pairs = lora_pairs(self.state.spec)

    def add(self, update: ClientUpdate, weight: float) -> None:
        local = self.state.params + update.delta  # the client's adapter in global units (a new array)
        rank = self.ranks.reply_rank(update, max(p.rank for p in self.pairs))
        for pair in self.pairs:  # only the reply's first r_k components count
            b, a = truncate_rank(*pair.factors(local), min(rank, pair.rank))
            term = weight * (b @ a)
            acc = self.products.get(pair.module)
            self.products[pair.module] = term if acc is None else acc + term
        self.total += weight

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        if self.total == 0:
            return delta, {}, {}
        arrays, worst = {}, 0.0
        for pair in self.pairs:
            product = self.products[pair.module] / self.total
            b, a, error = svd_reproject(product, pair.rank)
            arrays[residual_key(pair.module)] = (product - b @ a).astype(np.float32)
            self.factors[pair.module] = (b, a)
            worst = max(worst, error)
        return delta, arrays, {"flexlora_max_rel_residual": worst}

    def after_step(self, params: np.ndarray) -> np.ndarray:
        for pair in self.pairs:
            if pair.module in self.factors:
                params = pair.write(params, *self.factors[pair.module])
        return params
