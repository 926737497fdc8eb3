"""LoRA aggregation modes as FedOpt plug-ins (the math is in fedtune.aggregation.lora).

    ffa    FFA-LoRA (Sun et al. 2024): every lora_A is frozen when the model is built (seeded, so all clients
           hold the same A) and only B is exchanged; mean(B) @ A = sum_k p_k B_k A exactly, so plain FedOpt
           over B is the exact average. The plug-in only checks that the spec holds no lora_A.
    fedex  FedEx-LoRA (Singhal et al. 2024): adapters are averaged; the remainder
           sum_k p_k B_k A_k - mean(B) @ mean(A) is added to a dense per-module residual R.
    svd    the exact mean product re-projected to the adapter rank by truncated SVD; whatever does not fit
           in rank r (nothing, when the product's rank is <= r) goes to R.
    flora  FLoRA (Wang et al. 2024): clients train ranks r_k <= r (option "lora_rank"; the rest of their
           adapter is masked to zero), the server stacks their factors, merges the stacked product into R
           and re-initialises the global adapter (A random, B = 0) as in the paper.

For fedex, svd and flora the global model is W0 + s (R + B @ A) per LoRA module. R (``lora/residual/<module>``,
(out, in) float32, in B @ A units) lives in the server state and reaches clients in FitInstruction.extras;
``eval_payload`` sends the same arrays with every EvalInstruction, and ClientWorker writes W0 + s R into the
frozen base weights (``LoraResidual``) for fits and evaluations alike; ``fedtune export`` merges s R too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.aggregation.lora import LoraPair, lora_b_only, lora_pairs, stack_adapters, svd_reproject, truncate_rank
from fedtune.core.keys import RANK_OPTION, RESIDUAL_PREFIX
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.rng import derive_rng
from fedtune.core.state import ServerState
from fedtune.server.strategies.fedopt import NoFold, Payload, PluginFold


def residual_key(module: str) -> str:
    return RESIDUAL_PREFIX + module


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

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        lora_b_only(spec)  # raises when A is exchanged: the model was built without freezing it
        return {}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return {}, {}

    def eval_payload(self, state: ServerState) -> dict[str, np.ndarray]:
        return {}

    def begin(self, state: ServerState) -> PluginFold:
        lora_b_only(state.spec)  # also on resume, where init_arrays does not run
        return NoFold()


# --------------------------------------------------------------------------------------------- residual modes


@dataclass(frozen=True)
class _ResidualMode:
    """Shared by fedex / svd / flora: the dense residual arrays and their payload."""

    name: str

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        return {
            residual_key(p.module): np.zeros((p.out_features, p.in_features), np.float32)
            for p in _pairs_or_raise(spec, self.name)
        }

    def eval_payload(self, state: ServerState) -> dict[str, np.ndarray]:
        return {k: v for k, v in state.arrays.items() if k.startswith(RESIDUAL_PREFIX)}

    def payload(self, state: ServerState, client_id: str) -> Payload:
        return self.eval_payload(state), {}


def _add_residual(state: ServerState, pair: LoraPair, increment: np.ndarray) -> np.ndarray:
    return (state.arrays[residual_key(pair.module)].astype(np.float64) + increment).astype(np.float32)


@dataclass
class _ProductFold(NoFold):
    """Per module: sum w, sum w B_k, sum w A_k, sum w B_k A_k over the clients' local adapters."""

    state: ServerState
    mode: str  # "fedex" | "svd"
    pairs: list[LoraPair] = field(init=False)
    total: float = 0.0
    sums: dict[str, list[np.ndarray]] = field(default_factory=dict)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pairs = lora_pairs(self.state.spec)

    def add(self, update: ClientUpdate, weight: float) -> None:
        local = self.state.params + update.delta  # the client's adapter (a new array)
        for pair in self.pairs:
            b, a = pair.factors(local)
            terms = [weight * b, weight * a, weight * (b @ a)]
            acc = self.sums.get(pair.module)
            self.sums[pair.module] = terms if acc is None else [x + y for x, y in zip(acc, terms, strict=True)]
        self.total += weight

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        if self.total == 0:
            return delta, {}, {}
        arrays, worst = {}, 0.0
        for pair in self.pairs:
            b_mean, a_mean, product = (x / self.total for x in self.sums[pair.module])
            if self.mode == "fedex":
                b_new, a_new, error = b_mean, a_mean, 0.0
            else:
                b_new, a_new, error = svd_reproject(product, pair.rank)
            arrays[residual_key(pair.module)] = _add_residual(self.state, pair, product - b_new @ a_new)
            self.factors[pair.module] = (b_new, a_new)
            worst = max(worst, error)
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


@dataclass(frozen=True)
class SvdLora(_ResidualMode):
    name: str = "svd"

    def begin(self, state: ServerState) -> PluginFold:
        return _ProductFold(state, "svd")


# --------------------------------------------------------------------------------------------- FLoRA


@dataclass(frozen=True)
class FLoRA(_ResidualMode):
    seed: int = 0
    client_ranks: tuple[int, ...] | None = None  # None: every client trains the full rank
    name: str = "flora"

    def client_rank(self, client_id: str, full_rank: int) -> int:
        """A client's rank: a seeded draw from ``client_ranks``, fixed for the whole run."""
        if not self.client_ranks:
            return full_rank
        draw = derive_rng(self.seed, "lora-rank", client_id).integers(len(self.client_ranks))
        return min(int(self.client_ranks[draw]), full_rank)

    def init_arrays(self, params: np.ndarray, spec: ParamSpec) -> dict[str, np.ndarray]:
        arrays = super().init_arrays(params, spec)
        full = min(p.rank for p in lora_pairs(spec))
        if self.client_ranks and max(self.client_ranks) > full:
            raise ValueError(f"server.lora_client_ranks {list(self.client_ranks)} exceed the adapter rank {full}")
        return arrays

    def payload(self, state: ServerState, client_id: str) -> Payload:
        full = min(p.rank for p in lora_pairs(state.spec))
        rank = self.client_rank(client_id, full)
        return self.eval_payload(state), ({RANK_OPTION: rank} if rank < full else {})

    def begin(self, state: ServerState) -> PluginFold:
        return _StackFold(self, state)


@dataclass
class _StackFold(NoFold):
    plugin: FLoRA
    state: ServerState
    pairs: list[LoraPair] = field(init=False)
    weights: list[float] = field(default_factory=list)
    factors: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pairs = lora_pairs(self.state.spec)

    def add(self, update: ClientUpdate, weight: float) -> None:
        local = self.state.params + update.delta
        for pair in self.pairs:
            rank = self.plugin.client_rank(update.client_id, pair.rank)
            self.factors.setdefault(pair.module, []).append(truncate_rank(*pair.factors(local), rank))
        self.weights.append(weight)

    def finish(self, delta: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
        if not self.weights:
            return delta, {}, {}
        arrays, stacked_rank = {}, 0
        for pair in self.pairs:
            b_stack, a_stack = stack_adapters(self.factors[pair.module], self.weights)
            arrays[residual_key(pair.module)] = _add_residual(self.state, pair, b_stack @ a_stack)
            stacked_rank = max(stacked_rank, a_stack.shape[0])
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
