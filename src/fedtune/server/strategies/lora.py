"""LoRA aggregation modes as FedOpt plug-ins (the math is in fedtune.aggregation.lora).

    ffa    FFA-LoRA (Sun et al. 2024): every lora_A is frozen when the model is built (seeded, so all clients
           hold the same A) and only B is exchanged; mean(B) @ A = sum_k p_k B_k A exactly, so plain FedOpt
           over B is the exact average. The plug-in only checks that the spec holds no lora_A.
    fedex  FedEx-LoRA (Singhal et al. 2024): adapters are averaged; the remainder
           sum_k p_k B_k A_k - mean(B) @ mean(A) is added to a dense per-module residual R.
    svd    the exact mean product re-projected to the adapter rank by truncated SVD; whatever does not fit
           in rank r (nothing, when the product's rank is <= r) goes to R. The new factors are A = c V^T,
           B = U S / c with c the mean row norm of mean(A), so A keeps its scale (balanced sqrt(S) factors
           trained more slowly: docs/STRATEGIES.md, "Why svd learned more slowly").
    flora  FLoRA (Wang et al. 2024): clients train ranks r_k <= r (``server.lora_client_ranks``; see
           fedtune.server.strategies.lora_ranks), the server stacks their factors (sent in global units, so
           each one counts as s_k B_k A_k), merges the stacked product into R and re-initialises the global
           adapter (A random, B = 0) as in the paper.

HetLoRA and FlexLoRA (heterogeneous ranks without stacking) are in ``hetlora.py`` and ``flexlora.py``.

For fedex, svd and flora the global model is W0 + s (R + B @ A) per LoRA module. R (``lora/residual/<module>``,
(out, in) float32, in B @ A units) lives in the server state. A fit carries it as the increments since the
version the client holds, in factored form, where that is smaller (fedtune.server.strategies.lora_wire; the
client keeps its copy, fedtune.client.residual_copy), else dense; ``eval_payload`` does the same for an
evaluating client (the dense arrays where no client is named: export, generate). ClientWorker writes
W0 + s R into the frozen base weights (``LoraResidual``) for fits
and evaluations alike; ``fedtune export`` merges s R too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.aggregation.lora import (
    LoraPair,
    add_increment,
    factored_is_smaller,
    fedex_increment_factors,
    lora_b_only,
    lora_pairs,
    stack_adapters,
    svd_reproject,
    svd_tail_factors,
    truncate_rank,
)
from fedtune.core.keys import RANK_OPTION, RESIDUAL_PREFIX
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.rng import derive_rng
from fedtune.core.state import ServerState
from fedtune.core.strategy import LINEAR, Needs, Payload
from fedtune.server.strategies.fedopt import NoFold, PluginFold
from fedtune.server.strategies.lora_ranks import RankAssignment
from fedtune.server.strategies.lora_wire import record_round, residual_key, residual_payload

__all__ = ["RANK_OPTION", "RESIDUAL_PREFIX", "FLoRA", "FedExLora", "FfaLora", "SvdLora", "full_rank", "residual_key"]


def full_rank(spec: ParamSpec) -> int:
    """The global adapter's rank (the largest, should peft's rank_pattern give layers different ranks)."""
    return max(p.rank for p in lora_pairs(spec))


def check_ranks(ranks: RankAssignment, spec: ParamSpec) -> None:
    largest = ranks.largest()
    if largest is not None and largest > full_rank(spec):
        raise ValueError(f"server.lora_client_ranks go up to {largest}, above the adapter rank {full_rank(spec)}")


def _pairs_or_raise(spec: ParamSpec, mode: str) -> list[LoraPair]:
    pairs = lora_pairs(spec)
    if not pairs:
        raise ValueError(f"lora_aggregation {mode!r} needs LoRA adapters, but the model exchanges none")
    return pairs


# --------------------------------------------------------------------------------------------- FFA


@dataclass(frozen=True)
class FfaLora:
    """FFA-LoRA needs nothing from the server but a spec without lora_A (A is frozen at build time)."""

    name: str = "ffa"
    needs: Needs = LINEAR  # a fixed mask: plain FedOpt over B is exact

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        lora_b_only(spec)  # raises when A is exchanged: the model was built without freezing it
        return {}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return {}, {}

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        return {}

    def begin(self, state: ServerState) -> PluginFold:
        lora_b_only(state.spec)  # also on resume, where init_arrays does not run
        return NoFold()


# --------------------------------------------------------------------------------------------- residual modes


@dataclass(frozen=True)
class _ResidualMode:
    """Shared by fedex / svd / flora: the dense residual arrays and their payload."""

    name: str

    @property
    def needs(self) -> Needs:
        return Needs(individual=(f"the {self.name!r} plug-in",))  # it combines each client's factors

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        return {
            residual_key(p.module): np.zeros((p.out_features, p.in_features), np.float32)
            for p in _pairs_or_raise(spec, self.name)
        }

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        if client_id is not None:  # the increments since the version the client holds, where smaller
            return residual_payload(state, client_id, lora_pairs(state.spec))
        return {k: v for k, v in state.arrays.items() if k.startswith(RESIDUAL_PREFIX)}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return residual_payload(state, client_id, lora_pairs(state.spec)), {}


def _add_residual(state: ServerState, pair: LoraPair, increment: np.ndarray) -> np.ndarray:
    return (state.arrays[residual_key(pair.module)].astype(np.float64) + increment).astype(np.float32)


def _advance(
    state: ServerState, pair: LoraPair, exact: np.ndarray, factors: tuple[np.ndarray, np.ndarray], sent: dict
) -> np.ndarray:
    """The module's new residual. Where the increment's factors are smaller than the dense matrix it is
    advanced by exactly their float32 values (what clients receive and add: ``add_increment``), recorded in
    ``sent``; else by the float64 ``exact`` increment, and clients get the dense result."""
    b, a = (np.asarray(f, dtype=np.float32) for f in factors)
    if not factored_is_smaller(a.shape[0], pair.out_features, pair.in_features):
        return _add_residual(state, pair, exact)
    sent[pair.module] = (b, a)
    return add_increment(state.arrays[residual_key(pair.module)], b, a)


@dataclass
class _ProductFold(NoFold):
    """Per module: sum w, sum w B_k, sum w A_k, sum w B_k A_k over the clients' local adapters."""

    state: ServerState
    mode: str  # "fedex" | "svd"
    keep_a_scale: bool = True  # svd: A = c V^T with c the mean row norm of mean(A) (False: balanced sqrt(S))
    pairs: list[LoraPair] = field(init=False)
    total: float = 0.0
    sums: dict[str, list[np.ndarray]] = field(default_factory=dict)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # fedex: each client's (B_k, A_k) and weight, for the increment's factors (K adapters: its own size)
    local: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    weights: list[float] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pairs = lora_pairs(self.state.spec)

    def add(self, update: ClientUpdate, weight: float) -> None:
        local = self.state.params + update.delta  # the client's adapter (a new array)
        for pair in self.pairs:
            b, a = pair.factors(local)
            terms = [weight * b, weight * a, weight * (b @ a)]
            acc = self.sums.get(pair.module)
            self.sums[pair.module] = terms if acc is None else [x + y for x, y in zip(acc, terms, strict=True)]
            if self.mode == "fedex":
                self.local.setdefault(pair.module, []).append((b, a))
        self.total += weight
        self.weights.append(weight)
        self.clients.append(update.client_id)

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        if self.total == 0:
            return delta, {}, {}
        arrays, worst, sent = {}, 0.0, {}
        for pair in self.pairs:
            b_mean, a_mean, product = (x / self.total for x in self.sums[pair.module])
            if self.mode == "fedex":
                b_new, a_new, error = b_mean, a_mean, 0.0
                increment = fedex_increment_factors(self.local[pair.module], self.weights)
            else:
                scale = _mean_row_norm(a_mean) if self.keep_a_scale else None
                b_new, a_new, error = svd_reproject(product, pair.rank, a_row_norm=scale)
                increment = svd_tail_factors(product, pair.rank, len(self.weights) * pair.rank)
            arrays[residual_key(pair.module)] = _advance(self.state, pair, product - b_new @ a_new, increment, sent)
            self.factors[pair.module] = (b_new, a_new)
            worst = max(worst, error)
        arrays.update(record_round(self.state, self.pairs, sent, self.clients))
        return delta, arrays, ({"svd_max_rel_error": worst} if self.mode == "svd" else {})

    def after_step(self, params: np.ndarray) -> np.ndarray:
        for pair in self.pairs:
            if pair.module in self.factors:
                params = pair.write(params, *self.factors[pair.module])
        return params


@dataclass(frozen=True)
class FedExLora(_ResidualMode):
    name: str = "fedex"

    def begin(self, state: ServerState) -> PluginFold:
        return _ProductFold(state, "fedex")


def _mean_row_norm(a: np.ndarray) -> float | None:
    norm = float(np.linalg.norm(a, axis=1).mean())
    return norm if norm > 0 else None  # an all-zero A: fall back to balanced factors


@dataclass(frozen=True)
class SvdLora(_ResidualMode):
    name: str = "svd"
    keep_a_scale: bool = True  # False: the balanced B = U sqrt(S), A = sqrt(S) V^T of earlier versions

    def begin(self, state: ServerState) -> PluginFold:
        return _ProductFold(state, "svd", self.keep_a_scale)


# --------------------------------------------------------------------------------------------- FLoRA


@dataclass(frozen=True)
class FLoRA(_ResidualMode):
    seed: int = 0
    ranks: RankAssignment = field(default_factory=RankAssignment)  # none configured: every client at rank r
    name: str = "flora"

    def client_rank(self, client_id: str, full: int) -> int:
        """A client's rank, fixed for the whole run (see RankAssignment)."""
        return self.ranks.rank(client_id, full)

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        arrays = super().init_arrays(params, spec)
        check_ranks(self.ranks, spec)
        return arrays

    def payload(self, state: ServerState, client_id: str) -> Payload:
        arrays = residual_payload(state, client_id, lora_pairs(state.spec))
        return arrays, self.ranks.options(client_id, full_rank(state.spec))

    def begin(self, state: ServerState) -> PluginFold:
        return _StackFold(self, state)


@dataclass
class _StackFold(NoFold):
    plugin: FLoRA
    state: ServerState
    pairs: list[LoraPair] = field(init=False)
    weights: list[float] = field(default_factory=list)
    factors: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pairs = lora_pairs(self.state.spec)

    def add(self, update: ClientUpdate, weight: float) -> None:
        local = self.state.params + update.delta
        rank = self.plugin.ranks.reply_rank(update, max(p.rank for p in self.pairs))
        for pair in self.pairs:  # only the reply's first r_k components count (and keep the stack small)
            self.factors.setdefault(pair.module, []).append(truncate_rank(*pair.factors(local), min(rank, pair.rank)))
        self.weights.append(weight)
        self.clients.append(update.client_id)

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        if not self.weights:
            return delta, {}, {}
        arrays, stacked_rank, sent = {}, 0, {}
        for pair in self.pairs:
            b_stack, a_stack = stack_adapters(self.factors[pair.module], self.weights)
            arrays[residual_key(pair.module)] = _advance(self.state, pair, b_stack @ a_stack, (b_stack, a_stack), sent)
            stacked_rank = max(stacked_rank, a_stack.shape[0])
        arrays.update(record_round(self.state, self.pairs, sent, self.clients))
        return delta, arrays, {"flora_stacked_rank": stacked_rank}

    def after_step(self, params: np.ndarray) -> np.ndarray:
        """Fresh adapters for the next round: A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's default), B = 0."""
        if not self.weights:
            return params
        rng = derive_rng(self.plugin.seed, "flora-reinit", self.state.round + 1)
        for pair in self.pairs:
            bound = 1.0 / np.sqrt(pair.in_features)
            a = rng.uniform(-bound, bound, size=(pair.rank, pair.in_features))
            params = pair.write(params, np.zeros((pair.out_features, pair.rank)), a)
        return params
