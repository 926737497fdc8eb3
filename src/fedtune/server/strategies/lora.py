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

``server.lora_residual_rank`` q (opt-in) caps each round's increment at rank q and holds the rest back on the
server for later rounds (``lora/feedback/<module>``; error feedback, ``_Advance``): cheaper fits, but the
global model is no longer the exact average after a round (docs/STRATEGIES.md, "Capping the increment's rank").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedtune.aggregation.lora import (
    LoraPair,
    add_increment,
    capped_increment,
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

__all__ = [
    "FEEDBACK_PREFIX",
    "RANK_OPTION",
    "RESIDUAL_PREFIX",
    "FLoRA",
    "FedExLora",
    "FfaLora",
    "SvdLora",
    "feedback_key",
    "full_rank",
    "residual_key",
]

# server.lora_residual_rank: per module, the part of the residual's increments not sent yet ((out, in) float32,
# in B @ A units). Server-only: no payload carries it; the checkpoint does, so a resume continues exactly.
FEEDBACK_PREFIX = "lora/feedback/"


def feedback_key(module: str) -> str:
    return FEEDBACK_PREFIX + module


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
    """Shared by fedex / svd / flora: the dense residual arrays and their payload.

    ``residual_rank`` (``server.lora_residual_rank``, None: exact): each round the residual advances by only the
    best rank-``residual_rank`` part of (its exact increment + what earlier rounds held back), and the rest is
    held back for the next round (error feedback, ``fedtune.aggregation.lora.capped_increment``).
    """

    name: str
    residual_rank: int | None = None

    def __post_init__(self) -> None:
        q = self.residual_rank
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            raise ValueError(f"lora_residual_rank must be a positive integer or None, got {q!r}")

    @property
    def needs(self) -> Needs:
        return Needs(individual=(f"the {self.name!r} plug-in",))  # it combines each client's factors

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        pairs = _pairs_or_raise(spec, self.name)
        arrays = {residual_key(p.module): np.zeros((p.out_features, p.in_features), np.float32) for p in pairs}
        if self.residual_rank is not None:  # (a resume of a run begun without the cap: absent, read as zero)
            arrays |= {feedback_key(p.module): np.zeros((p.out_features, p.in_features), np.float32) for p in pairs}
        return arrays

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        if client_id is not None:  # the increments since the version the client holds, where smaller
            return residual_payload(state, client_id, lora_pairs(state.spec))
        return {k: v for k, v in state.arrays.items() if k.startswith(RESIDUAL_PREFIX)}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return residual_payload(state, client_id, lora_pairs(state.spec)), {}


def _add_residual(state: ServerState, pair: LoraPair, increment: np.ndarray) -> np.ndarray:
    return (state.arrays[residual_key(pair.module)].astype(np.float64) + increment).astype(np.float32)


@dataclass
class _Advance:
    """Advances each module's residual by its round's increment; collects what was sent in factors and, under
    a rank cap, how much was held back."""

    state: ServerState
    cap: int | None = None  # server.lora_residual_rank
    sent: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    held_sq: float = 0.0  # sum over modules of ||E'||^2 (what is held back after this round)
    target_sq: float = 0.0  # sum over modules of ||increment + E||^2

    def __call__(
        self, pair: LoraPair, exact: np.ndarray, factors: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """The module's new state arrays, given its exact float64 increment and a function giving that
        increment's factors.

        Exact (no cap): where the factors are smaller than the dense matrix the residual is advanced by exactly
        their float32 values (what clients receive and add: ``add_increment``), recorded in ``sent``; else by
        the float64 ``exact`` increment, and clients get the dense result. Capped: by the float32 factors of the
        best rank-``cap`` part of ``exact`` + E, the rest becoming the new E; by all of it, densely, where
        rank-``cap`` factors are no smaller than the matrix (E is then zero)."""
        key, held = residual_key(pair.module), self.state.arrays.get(feedback_key(pair.module))
        if self.cap is None and (held is None or not held.any()):
            b, a = (np.asarray(f, dtype=np.float32) for f in factors())
            if not factored_is_smaller(a.shape[0], pair.out_features, pair.in_features):
                return {key: _add_residual(self.state, pair, exact)}
            self.sent[pair.module] = (b, a)
            return {key: add_increment(self.state.arrays[key], b, a)}
        target = exact if held is None else exact + held.astype(np.float64)
        self.target_sq += float(np.square(target).sum())
        nothing_held = np.zeros((pair.out_features, pair.in_features), np.float32)
        rank = None if self.cap is None else min(self.cap, pair.out_features, pair.in_features)
        if rank is None or not factored_is_smaller(rank, pair.out_features, pair.in_features):
            # all of it, densely: a capped run resumed without the cap (what was held back goes out now), or a
            # module whose rank-q factors would be no smaller than the matrix
            return {key: _add_residual(self.state, pair, target), feedback_key(pair.module): nothing_held}
        b, a, rest = capped_increment(target, rank)
        self.sent[pair.module] = (b, a)
        self.held_sq += float(np.square(rest).sum())
        return {key: add_increment(self.state.arrays[key], b, a), feedback_key(pair.module): rest.astype(np.float32)}

    def metrics(self) -> dict[str, float]:
        """Under a cap: ||E|| / ||increment + E|| over all modules after this round (0: everything was sent)."""
        if self.cap is None:
            return {}
        return {"lora_residual_held_back": float(np.sqrt(self.held_sq / self.target_sq)) if self.target_sq else 0.0}


@dataclass
class _ProductFold(NoFold):
    """Per module: sum w, sum w B_k, sum w A_k, sum w B_k A_k over the clients' local adapters."""

    state: ServerState
    mode: str  # "fedex" | "svd"
    keep_a_scale: bool = True  # svd: A = c V^T with c the mean row norm of mean(A) (False: balanced sqrt(S))
    cap: int | None = None  # server.lora_residual_rank
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
        arrays, worst, advance = {}, 0.0, _Advance(self.state, self.cap)
        for pair in self.pairs:
            b_mean, a_mean, product = (x / self.total for x in self.sums[pair.module])
            if self.mode == "fedex":
                b_new, a_new, error = b_mean, a_mean, 0.0
                local = self.local[pair.module]
                increment = functools.partial(fedex_increment_factors, local, self.weights)
            else:
                scale = _mean_row_norm(a_mean) if self.keep_a_scale else None
                b_new, a_new, error = svd_reproject(product, pair.rank, a_row_norm=scale)
                increment = functools.partial(svd_tail_factors, product, pair.rank, len(self.weights) * pair.rank)
            arrays.update(advance(pair, product - b_new @ a_new, increment))
            self.factors[pair.module] = (b_new, a_new)
            worst = max(worst, error)
        arrays.update(record_round(self.state, self.pairs, advance.sent, self.clients))
        return delta, arrays, ({"svd_max_rel_error": worst} if self.mode == "svd" else {}) | advance.metrics()

    def after_step(self, params: np.ndarray) -> np.ndarray:
        for pair in self.pairs:
            if pair.module in self.factors:
                params = pair.write(params, *self.factors[pair.module])
        return params


@dataclass(frozen=True)
class FedExLora(_ResidualMode):
    name: str = "fedex"

    def begin(self, state: ServerState) -> PluginFold:
        return _ProductFold(state, "fedex", cap=self.residual_rank)


def _mean_row_norm(a: np.ndarray) -> float | None:
    norm = float(np.linalg.norm(a, axis=1).mean())
    return norm if norm > 0 else None  # an all-zero A: fall back to balanced factors


@dataclass(frozen=True)
class SvdLora(_ResidualMode):
    name: str = "svd"
    keep_a_scale: bool = True  # False: the balanced B = U sqrt(S), A = sqrt(S) V^T of earlier versions

    def begin(self, state: ServerState) -> PluginFold:
        return _ProductFold(state, "svd", self.keep_a_scale, cap=self.residual_rank)


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
        arrays, stacked_rank, advance = {}, 0, _Advance(self.state, self.plugin.residual_rank)
        for pair in self.pairs:
            b_stack, a_stack = stack_adapters(self.factors[pair.module], self.weights)
            arrays.update(advance(pair, b_stack @ a_stack, lambda b=b_stack, a=a_stack: (b, a)))
            stacked_rank = max(stacked_rank, a_stack.shape[0])
        arrays.update(record_round(self.state, self.pairs, advance.sent, self.clients))
        return delta, arrays, {"flora_stacked_rank": stacked_rank} | advance.metrics()

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
