"""HetLoRA (Cho et al. 2024): heterogeneous ranks by rank truncation and zero-padding.

Client k receives the global rank-r adapter truncated to its rank r_k (option ``lora_rank``; the client
takes the first r_k components, ``fedtune.aggregation.lora_ranks.to_client_rank``), trains it, and replies
with it zero-padded to rank r in global units. The server averages those padded factors like FedAvg:

    B = sum_k p_k pad(B~_k),   A = sum_k p_k pad(A~_k)

so component j shrinks by the share of clients whose rank is below j, and, as for naive LoRA averaging,
B A is not sum_k p_k B~_k A~_k. This is the baseline the exact modes (flora, flexlora) are measured against;
the paper's rank self-pruning and sparsity-weighted aggregation are not implemented.

The global model is exactly the rank-r adapter: W0 + s B A (no residual), so the plain peft export is it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.core.strategy import Needs
from fedtune.server.strategies.fedopt import NoFold, Payload, PluginFold
from fedtune.server.strategies.lora import _pairs_or_raise, check_ranks, full_rank
from fedtune.server.strategies.lora_ranks import RankAssignment


@dataclass(frozen=True)
class HetLora:
    ranks: RankAssignment = field(default_factory=RankAssignment)
    name: str = "hetlora"

    @property
    def needs(self) -> Needs:
        # the fold counts only each reply's first r_k components (its announced rank): individual replies
        return Needs(individual=(f"the {self.name!r} plug-in",))

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        _pairs_or_raise(spec, self.name)
        check_ranks(self.ranks, spec)
        return {}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return {}, self.ranks.options(client_id, full_rank(state.spec))

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

    def begin(self, state: ServerState) -> PluginFold:
        # the zero-padded replies make FedAvg of the deltas the zero-padding average: nothing to add
        return NoFold()
