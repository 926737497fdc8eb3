"""HetLoRA (Cho et al. 2024): heterogeneous ranks by rank truncation and zero-padding.

Client k receives the global rank-r adapter truncated to its rank r_k (option ``lora_rank``; the client
takes the first r_k components, ``fedtune.aggregation.lora_ranks.to_client_rank``), trains it, and replies
with it zero-padded to rank r in global units. By default the server averages those padded factors like
FedAvg, with the usual data weights p_k:

    B = sum_k p_k pad(B~_k),   A = sum_k p_k pad(A~_k)

so component j shrinks by the share of clients whose rank is below j, and, as for naive LoRA averaging,
B A is not sum_k p_k B~_k A~_k. This is the baseline the exact modes (flora, flexlora) are measured against.

``server.hetlora`` adds the paper's two other mechanisms (Cho et al. 2024, section 3), each opt-in:

* rank self-pruning (``prune_gamma`` = gamma, ``prune_lambda`` = lambda). Client k trains with the paper's
  regulariser added to its local loss,

      min  loss_k(B_k, A_k) + lambda ||B_k[:, g:r_k]||_F ||A_k[g:r_k]||_F,      g = floor(gamma r_k),

  which drives the last (1 - gamma) r_k components toward zero. After training it evaluates that term's norm
  P_k(t) = sum_layers ||B_k[:, g:r_k]||_F ||A_k[g:r_k]||_F and, when P_k(t) is smaller than P_k at its
  previous fit at the same rank, prunes: it trains at rank max(1, g) from then on (the paper's rule as we
  read its method section: prune by the decay factor when the regulariser's norm shrank from the previous
  round; its full text was not at hand here, only summaries and public re-implementations). The
  reply reports P_k (metric ``hetlora_prune_norm``) and the rank it keeps (``lora_rank_next``); the server
  keeps both per client in the state (``hetlora/client/<id>``, so a resumed run continues them) and sends
  min(assigned rank, kept rank) and the previous P_k with the client's next fit. Right after a prune there is
  no previous P_k to compare with (the tail window moved), so a client prunes at most every other fit.
  What this implementation chose where the paper leaves it open: the norm is summed over the adapted layers
  (one rank per client, as the paper's r_k), a rank-1 client neither regularises nor prunes, and the
  regulariser is lambda times the product of the two norms (not squared).

* sparsity-weighted aggregation (``aggregation: sparsity``). Each client's padded adapter is weighted by
  the Frobenius norm of the change it reconstructs instead of its data share:

      S_k = ||Delta W_k||_F,  Delta W_k = B~_k A~_k (all layers together)   w_k = S_k / Z,  Z = sum_k S_k
      B = sum_k w_k pad(B~_k),   A = sum_k w_k pad(A~_k)      (the other trainable parameters likewise)

  (the paper's Figure 2 (a)-(b); up to the common factor s = alpha / r, which cancels in w_k). A round
  whose replies all reconstruct zero falls back to the data weights.

The global model is exactly the rank-r adapter: W0 + s B A (no residual), so the plain peft export is it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from fedtune.aggregation.lora import LoraPair
from fedtune.aggregation.lora_ranks import product_norm, zero_beyond
from fedtune.config.lora_ranks import HetLoraConfig
from fedtune.core.keys import (
    NEXT_RANK_METRIC,
    PRUNE_GAMMA_OPTION,
    PRUNE_LAMBDA_OPTION,
    PRUNE_NORM_METRIC,
    PRUNE_PREVIOUS_OPTION,
    RANK_OPTION,
    RSLORA_OPTION,
)
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.core.strategy import Needs
from fedtune.server.strategies.fedopt import NoFold, Payload, PluginFold
from fedtune.server.strategies.lora import _pairs_or_raise, check_ranks, full_rank
from fedtune.server.strategies.lora_ranks import (
    PRUNED_PREFIX,
    RankAssignment,
    RankRecord,
    current_rank,
    rank_record,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HetLora:
    ranks: RankAssignment = field(default_factory=RankAssignment)
    options: HetLoraConfig = field(default_factory=HetLoraConfig)  # server.hetlora (default: zero-padding only)
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
        full = full_rank(state.spec)
        rank = current_rank(self.ranks, state, client_id, full)
        options = {RANK_OPTION: rank, RSLORA_OPTION: self.ranks.rslora} if rank < full else {}
        if self.options.prunes:
            options |= {PRUNE_GAMMA_OPTION: self.options.prune_gamma, PRUNE_LAMBDA_OPTION: self.options.prune_lambda}
            record = rank_record(state, client_id)
            if record is not None and record.previous_norm is not None:
                options[PRUNE_PREVIOUS_OPTION] = record.previous_norm
        return {}, options

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

    def begin(self, state: ServerState) -> PluginFold:
        if not self.options.prunes and self.options.aggregation == "examples":
            # the zero-padded replies make FedAvg of the deltas the zero-padding average: nothing to add
            return NoFold()
        return _HetFold(state, self.ranks, self.options)


@dataclass
class _HetFold(NoFold):
    """Records each reply's self-pruning; under sparsity weighting, also sums w_k pad(adapter_k)."""

    state: ServerState
    ranks: RankAssignment
    options: HetLoraConfig
    pairs: list[LoraPair] = field(init=False)
    full: int = field(init=False)
    records: dict[str, np.ndarray] = field(default_factory=dict)
    weighted: np.ndarray | None = None  # sum_k S_k pad(local_k), float64
    total: float = 0.0  # Z = sum_k S_k

    def __post_init__(self) -> None:
        self.pairs = _pairs_or_raise(self.state.spec, "hetlora")
        self.full = full_rank(self.state.spec)

    def add(self, update: ClientUpdate, weight: float) -> None:
        rank = self.ranks.reply_rank(update, self.full)
        if self.options.prunes:
            self._record(update, rank)
        if self.options.aggregation == "sparsity" and weight > 0:
            # the client's adapter in global units, only its first r_k components (the padding is zeros)
            local = zero_beyond(self.state.params + update.delta, self.pairs, rank)
            norm = product_norm(local, self.pairs, rank)
            term = norm * local.astype(np.float64)
            self.weighted = term if self.weighted is None else self.weighted + term
            self.total += norm

    def _record(self, update: ClientUpdate, rank: int) -> None:
        norm, kept = update.metrics.get(PRUNE_NORM_METRIC), update.metrics.get(NEXT_RANK_METRIC)
        if norm is None or kept is None:
            return  # a rank-1 client, or one that does not prune: nothing to remember
        kept = int(kept)
        if not 0 < kept <= rank or not np.isfinite(norm):
            log.warning(
                "client %s reports self-pruning to rank %s (norm %s) after training at rank %d: ignored",
                update.client_id, kept, norm, rank,
            )  # fmt: skip
            return
        # after a prune the tail window moved: the next fit has no norm to compare with
        record = RankRecord(kept, float(norm) if kept == rank else None)
        self.records[PRUNED_PREFIX + update.client_id] = record.array()

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        metrics: dict = {}
        if self.records:  # the ranks the round's replies keep (a lower mean: clients pruned)
            metrics["hetlora_mean_rank"] = float(np.mean([r[0] for r in self.records.values()]))
        if self.options.aggregation != "sparsity" or self.weighted is None or self.total <= 0:
            return delta, self.records, metrics  # (no reply reconstructs a change: the data weights)
        mean = self.weighted / self.total
        return (mean - self.state.params).astype(np.float32), self.records, metrics
