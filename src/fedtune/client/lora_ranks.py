"""The client half of heterogeneous LoRA ranks (flora / hetlora / flexlora): train a rank-r_k adapter.

A client told ``lora_rank = r_k`` (and ``lora_rslora``) by the server, or configured with its own rank
(a deployed participant's ``model.lora.r``), is for the length of one fit exactly a rank-r_k LoRA:

1. the global vector it received is rewritten to its rank (``to_client_rank``: the first r_k components,
   B scaled by s / s_k) -- the adapter it starts from is the one the server sent, never re-initialised;
2. every adapted layer's scaling becomes s_k = alpha / r_k (alpha / sqrt(r_k) under rsLoRA);
3. the gradients of the components beyond r_k are zeroed at every step, so they stay zero (Adam's update
   of a zero gradient is zero; weight decay of a zero weight is zero);
4. after training, the fit's finish converts the reply back to global units (``from_client_rank``) and the
   model holds it, so the worker's resident model is the global layout again; the fit's cleanup gives the
   layers their scaling s back, on success and on failure alike.

The factory is registered first, so its finish runs last among the fit's finishes: after the straggler's
(which reports a snapshot in client units) and before the update transforms, clipping and privacy (what
leaves the client is what they see). Everything one fit needs lives in that fit's closures.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedtune.aggregation.lora import A_SUFFIX, B_SUFFIX, LoraPair, lora_pairs
from fedtune.aggregation.lora_ranks import from_client_rank, kept_rank, scale_ratio, tail_norm, to_client_rank
from fedtune.client.weights import TrainableView
from fedtune.core.fit import LocalHooks
from fedtune.core.keys import (
    NEXT_RANK_METRIC,
    PRUNE_GAMMA_OPTION,
    PRUNE_LAMBDA_OPTION,
    PRUNE_NORM_METRIC,
    PRUNE_PREVIOUS_OPTION,
    RANK_METRIC,
    RANK_OPTION,
    RSLORA_OPTION,
)
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.tasks.base import Task


@dataclass
class LoraRanks:
    """``own_rank``: this participant's configured rank (deployment); the server's option can only lower it.
    ``own_rslora``: its model.lora.use_rslora, for a fit the server sent no ``lora_rslora`` with.

    ``pruned``: the rank each client lowered itself to by HetLoRA's self-pruning (its fits' finishes record
    it). The server sends that rank back with every later fit; a deployed participant also remembers it here,
    so it never trains above it whatever a server sends."""

    own_rank: int | None = None
    own_rslora: bool = False
    pruned: dict[str, int] = field(default_factory=dict)
    _scaling: dict[tuple[int, str], float] = field(default_factory=dict)  # (model id, layer) -> s

    def rank_of(self, instr: FitInstruction) -> int | None:
        return self.rank_for(instr.client_id, instr.options.get(RANK_OPTION))

    def rank_for(self, client_id: str, offered: int | None) -> int | None:
        """min(the server's rank, this participant's own, the one it pruned to); None: none of them."""
        ranks = [r for r in (offered, self.own_rank, self.pruned.get(client_id)) if r is not None]
        return min(int(r) for r in ranks) if ranks else None

    def hooks(self, task: Task, instr: FitInstruction, view: TrainableView) -> LocalHooks:
        rank = self.rank_of(instr)
        prune = _SelfPruning.from_options(instr.options)
        pairs = lora_pairs(view.spec) if rank is not None or prune is not None else []
        full = max((p.rank for p in pairs), default=0)
        rank = full if rank is None else min(rank, full)
        rslora = bool(instr.options.get(RSLORA_OPTION, self.own_rslora))
        hooks = self.at_rank(task, view, instr.params, rank, rslora=rslora) if pairs else LocalHooks()
        if not pairs:
            self._reset_scaling(task.module)
        if prune is not None and pairs:
            hooks.extend(prune.hooks(self, instr, view, pairs, rank))
        return hooks

    def at_rank(
        self, task: Task, view: TrainableView, start: np.ndarray, rank: int, *, rslora: bool
    ) -> LocalHooks:
        """What makes the model a rank-``rank`` LoRA from ``start`` (a global-unit vector) until the cleanup:
        the vector rewritten, the layers' scaling s_k, the gradient mask, and a finish that converts the reply
        back to global units. The fit's hook and fine-tuning after federation both use it. A rank at or above
        the adapter's is the plain model (the global scaling everywhere)."""
        pairs = lora_pairs(view.spec)
        if not pairs or rank >= max(p.rank for p in pairs):
            self._reset_scaling(task.module)  # a full-rank fit: the global scaling everywhere
            return LocalHooks()
        view.write(to_client_rank(view.read(), pairs, rank, rslora=rslora))
        self._set_scaling(task.module, pairs, rank, rslora)

        def finish(update: ClientUpdate) -> ClientUpdate:
            local = start + update.delta  # the client's rank-r_k vector (client units)
            sent = from_client_rank(local, pairs, rank, rslora=rslora)
            view.write(sent)  # the resident model: the reply, in the global layout and scaling
            return replace(update, delta=sent - start, metrics={**update.metrics, RANK_METRIC: float(rank)})

        def cleanup() -> None:
            self._reset_scaling(task.module)

        return LocalHooks(grad_hooks=[_grad_mask(view, rank)], finish=[finish], cleanup=[cleanup])

    def _set_scaling(self, model: torch.nn.Module, pairs: list[LoraPair], rank: int, rslora: bool) -> None:
        """Each adapted layer's scaling becomes s_k (its global s is remembered the first time)."""
        for pair in pairs:
            layer = model.get_submodule(pair.module)
            base = self._scaling.setdefault((id(model), pair.module), _get_scaling(layer))
            _put_scaling(layer, base * scale_ratio(min(rank, pair.rank), pair.rank, rslora=rslora))

    def _reset_scaling(self, model: torch.nn.Module) -> None:
        """Every layer of ``model`` an earlier fit changed gets its global scaling s back."""
        for (model_id, name), base in self._scaling.items():
            if model_id == id(model):
                _put_scaling(model.get_submodule(name), base)


def _grad_mask(view: TrainableView, rank: int):
    a_params = [p for n, p in zip(view.spec.names, view.params, strict=True) if n.endswith(A_SUFFIX)]  # (r, in)
    b_params = [p for n, p in zip(view.spec.names, view.params, strict=True) if n.endswith(B_SUFFIX)]  # (out, r)

    def mask() -> None:
        for p in a_params:
            if p.grad is not None:
                p.grad[rank:] = 0.0
        for p in b_params:
            if p.grad is not None:
                p.grad[:, rank:] = 0.0

    return mask


def _get_scaling(layer: torch.nn.Module) -> float:
    scaling = layer.scaling
    if isinstance(scaling, dict):
        if len(scaling) != 1:
            raise ValueError(f"heterogeneous LoRA ranks support one adapter per layer, found {len(scaling)}")
        return float(next(iter(scaling.values())))
    return float(scaling)


def _put_scaling(layer: torch.nn.Module, value: float) -> None:
    if isinstance(layer.scaling, dict):
        layer.scaling[next(iter(layer.scaling))] = value
    else:
        layer.scaling = value


@dataclass(frozen=True)
class _SelfPruning:
    """HetLoRA's rank self-pruning for one fit (``fedtune.server.strategies.hetlora`` has the equations)."""

    gamma: float
    lam: float
    previous: float | None  # P_k at this client's previous fit at this rank (None: nothing to compare with)

    @classmethod
    def from_options(cls, options: dict) -> _SelfPruning | None:
        if PRUNE_GAMMA_OPTION not in options:
            return None
        previous = options.get(PRUNE_PREVIOUS_OPTION)
        return cls(
            float(options[PRUNE_GAMMA_OPTION]),
            float(options.get(PRUNE_LAMBDA_OPTION, 0.0)),
            None if previous is None else float(previous),
        )

    def hooks(
        self, ranks: LoraRanks, instr: FitInstruction, view: TrainableView, pairs: list[LoraPair], rank: int
    ) -> LocalHooks:
        keep = kept_rank(rank, self.gamma)
        if keep < 1:  # a rank-1 client has nothing to prune
            return LocalHooks()
        hooks = LocalHooks()
        if self.lam > 0:
            hooks.loss_terms.append(_tail_term(view, pairs, rank, self.gamma, self.lam))

        def finish(update: ClientUpdate) -> ClientUpdate:
            # registered after the rank conversion's finish, so it runs first: the delta is in client units
            norm = tail_norm(instr.params + update.delta, pairs, rank, self.gamma)
            prune = self.previous is not None and norm < self.previous
            if prune:
                ranks.pruned[instr.client_id] = keep  # a participant remembers it (the server does too)
            metrics = {PRUNE_NORM_METRIC: norm, NEXT_RANK_METRIC: float(keep if prune else rank)}
            return replace(update, metrics={**update.metrics, **metrics})

        hooks.finish.append(finish)
        return hooks


def _tail_term(view: TrainableView, pairs: list[LoraPair], rank: int, gamma: float, lam: float):
    """lambda sum_layers ||B[:, g:r_k]||_F ||A[g:r_k]||_F over the live parameters (differentiable); the
    same sum as ``tail_norm``, g = floor(gamma r_k) per layer."""
    by_name = dict(zip(view.spec.names, view.params, strict=True))
    tails = []
    for pair in pairs:
        r = min(rank, pair.rank)
        tails.append((by_name[pair.module + B_SUFFIX], by_name[pair.module + A_SUFFIX], kept_rank(r, gamma), r))

    def term() -> torch.Tensor:
        return lam * sum(torch.linalg.norm(b[:, g:r]) * torch.linalg.norm(a[g:r]) for b, a, g, r in tails)

    return term
