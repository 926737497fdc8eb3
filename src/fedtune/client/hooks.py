"""Client-side halves of the strategies: local-training hooks and update transforms.

Every hook here is inert unless the FitInstruction asks for it (an option or an extras array the server's
plug-in sent), so ``build_client_extensions`` can register all of them and the server decides per round:

    ProximalTerm     FedProx: loss + mu/2 ||w - w_global||^2           option "proximal_mu"
    ScaffoldControl  SCAFFOLD: grad += c - c_i; reply carries dc_i      extras "scaffold/c", "scaffold/c_i"
    stragglers       FedProx stragglers: partial work, still sent       client.straggler_fraction
    LoraRanks        heterogeneous ranks: train a rank-r_k adapter      option "lora_rank" (client/lora_ranks.py)
    LoraResidual     base weight = W0 + s R for exact LoRA modes        extras "lora/residual/<module>"

LoraResidual is not a training hook: the residual is part of the global model, so ClientWorker loads it
with the trainable vector for every fit and evaluation. FFA-LoRA needs no client hook either: its A
matrices are frozen when the model is built (``fedtune.models.lora.freeze_lora_a``).

Hooks that need per-fit memory (a straggler's snapshot) keep it in the closures of the LocalHooks they
return for that fit, with a ``finish`` that turns the reply into what is sent (fedtune.core.fit): nothing
outlives the fit, and a fit that fails leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedtune.client.weights import TrainableView
from fedtune.core.fit import LocalHooks
from fedtune.core.keys import C_KEY, CI_KEY, DC_KEY, PROXIMAL_OPTION, RESIDUAL_PREFIX
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.core.rng import derive_rng
from fedtune.tasks.base import Task


def _slices(flat: np.ndarray, view: TrainableView) -> list[torch.Tensor]:
    """Per-parameter float32 tensors (copies) of a flat vector laid out like ``view``, each on the device of
    the parameter it shadows (a data-parallel rank's GPU, or the CPU)."""
    return [
        torch.from_numpy(np.array(flat[start:stop], dtype=np.float32)).view(shape).to(param.device)
        for (_, start, stop, shape), param in zip(view.spec.offsets(), view.params, strict=True)
    ]


# --------------------------------------------------------------------------------------------- FedProx


def proximal_term(task: Task, instr: FitInstruction, view: TrainableView) -> LocalHooks:
    """FedProx (Li et al. 2020): add mu/2 ||w - w_t||^2 over the trainable parameters to every step's loss.

    w_t is the point this fit starts from: the received vector, or, for a client of heterogeneous LoRA rank,
    its rank-r_k rewrite of it (the rank hook runs first and rewrites the model; ``instr.params`` would hold
    B in global units and the components beyond r_k, pulling the client toward a model it never held)."""
    mu = float(instr.options.get(PROXIMAL_OPTION, 0.0))
    if mu <= 0:
        return LocalHooks()
    anchors = _slices(view.read(), view)

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - w0) ** 2).sum() for p, w0 in zip(view.params, anchors, strict=True))

    return LocalHooks(loss_terms=[term])


def straggler_budget(instr: FitInstruction) -> int | None:
    """The steps a straggler may take this round, or None for a client that is not one.

    A client is a straggler with probability ``client.straggler_fraction``, drawn from
    (seed, "straggler", round, client); it stops after a uniform number of steps in [1, local_steps)."""
    fraction, steps = instr.train.straggler_fraction, instr.train.local_steps
    if fraction <= 0 or not steps or steps < 2:
        return None
    rng = derive_rng(instr.seed, "straggler", instr.round, instr.client_id)
    if rng.random() >= fraction:
        return None
    return int(rng.integers(1, steps))


def stragglers(task: Task, instr: FitInstruction, view: TrainableView) -> LocalHooks:
    """Some clients stop early and send partial work (FedProx's system heterogeneity).

    The trainer has no early exit, so the hook snapshots the parameters when the budget is spent and the
    fit's finish reports that snapshot: the reply is exactly what stopping there would have sent (the
    simulation still spends the remaining steps' compute). The snapshot lives in this fit's closures only.
    """
    budget = straggler_budget(instr)
    if budget is None:
        return LocalHooks()
    calls, taken = [0], []

    def snapshot() -> None:  # runs before step calls[0] + 1: the parameters hold `calls` steps
        if calls[0] == budget:
            taken.append(view.read())
        calls[0] += 1

    def finish(update: ClientUpdate) -> ClientUpdate:
        if not taken:
            return update
        return replace(
            update,
            delta=taken[0] - instr.params,
            metrics={**update.metrics, "steps": float(budget), "straggler": 1.0},
        )

    return LocalHooks(grad_hooks=[snapshot], finish=[finish])


# --------------------------------------------------------------------------------------------- SCAFFOLD


def scaffold_correction(task: Task, instr: FitInstruction, view: TrainableView) -> LocalHooks:
    """SCAFFOLD (Karimireddy et al. 2020): every local gradient gets c - c_i added."""
    if C_KEY not in instr.extras:
        return LocalHooks()
    correction = _slices(instr.extras[C_KEY].astype(np.float64) - instr.extras[CI_KEY], view)

    def correct() -> None:
        for p, corr in zip(view.params, correction, strict=True):
            if p.grad is not None:  # a frozen (grad None) parameter stays frozen
                p.grad.add_(corr.to(p.grad.dtype))

    return LocalHooks(grad_hooks=[correct])


def scaffold_control_delta(update: ClientUpdate, instr: FitInstruction) -> ClientUpdate:
    """Option II of the paper: dc_i = c_i+ - c_i = -c - delta / (K lr), attached as extras "scaffold/dc"."""
    if C_KEY not in instr.extras:
        return update
    steps = max(1.0, float(update.metrics.get("steps", 1.0)))
    lr = instr.train.lr
    dc = -instr.extras[C_KEY].astype(np.float64) - update.delta.astype(np.float64) / (steps * lr)
    return replace(update, extras={**update.extras, DC_KEY: dc.astype(np.float32)})


# --------------------------------------------------------------------------------------------- LoRA


@dataclass
class LoraResidual:
    """The base-weight half of the global model in the exact LoRA modes (fedex / svd / flora / flexlora).

    ``load(model, extras)`` makes every adapted layer compute what ``extras`` says: W0 + s R for each
    ``lora/residual/<module>`` array, and W0 again for a layer it changed before that has no residual now.
    ClientWorker calls it for every fit (the layer keeps it afterwards; the next request loads its own) and
    around every evaluation (``applied``: W0 is restored after).

    Two ways to apply s R, the same function in exact arithmetic:

    * ``separate=False`` (fp32 compute, export): W0 + s R is written into the frozen base weight (W0 is
      remembered the first time a layer is changed, so a new R replaces the old one instead of accumulating).
    * ``separate=True`` (bf16 autocast): W0 stays; a forward hook makes the layer compute W0 x in bf16 plus
      the whole change s (B A + R) x in float32 with autocast off. Folded into W0, s R is cast to bf16 with
      it, and every entry of s R below half of W0's bf16 ulp there is rounded away; added after peft's
      forward, the adapter's s B A x is still rounded to bf16, so fedex and svd (one product, split two
      ways) differ by more than float32 rounding (tests/test_lora_exact_bf16.py).
    """

    separate: bool = False
    _base: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    _delta: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # separate: s R (out, in), fp32
    _hooked: set[tuple[int, str]] = field(default_factory=set)
    _base_out: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # separate: this call's W0 x

    def load(self, model: torch.nn.Module, extras: Mapping[str, np.ndarray]) -> None:
        residuals = {k.removeprefix(RESIDUAL_PREFIX): v for k, v in extras.items() if k.startswith(RESIDUAL_PREFIX)}
        if self.separate:
            self._load_separate(model, residuals)
            return
        for module_name in residuals:
            self._remember(model, module_name)
        for (model_id, module_name), base in self._base.items():
            if model_id != id(model):
                continue
            weight = base_weight(model.get_submodule(module_name))
            with torch.no_grad():
                if module_name in residuals:
                    update = scaled_residual(model, module_name, residuals[module_name])
                    weight.copy_(base + update.to(device=weight.device, dtype=weight.dtype))
                else:
                    weight.copy_(base)

    def reset(self, model: torch.nn.Module) -> None:
        """Every layer of ``model`` this object changed gets W0 back."""
        self.load(model, {})

    @contextmanager
    def applied(self, model: torch.nn.Module, extras: Mapping[str, np.ndarray]) -> Iterator[None]:
        self.load(model, extras)
        try:
            yield
        finally:
            self.reset(model)

    def _remember(self, model: torch.nn.Module, module_name: str) -> None:
        key = (id(model), module_name)
        if key not in self._base:
            self._base[key] = base_weight(model.get_submodule(module_name)).detach().clone()

    def _load_separate(self, model: torch.nn.Module, residuals: Mapping[str, np.ndarray]) -> None:
        for key in [k for k in self._delta if k[0] == id(model)]:
            del self._delta[key]  # a layer without a residual in this request computes W0 x
            self._base_out.pop(key, None)
        for module_name, residual in residuals.items():
            key = (id(model), module_name)
            layer = model.get_submodule(module_name)
            update = scaled_residual(model, module_name, residual)
            if getattr(layer, "fan_in_fan_out", False):
                update = update.T  # back to (out, in) for F.linear
            self._delta[key] = update.to(device=base_weight(layer).device, dtype=torch.float32).contiguous()
            if key not in self._hooked:
                if hasattr(layer, "base_layer"):
                    layer.base_layer.register_forward_hook(self._capture_hook(key))
                layer.register_forward_hook(self._forward_hook(key))
                self._hooked.add(key)

    def _capture_hook(self, key: tuple[int, str]):
        def capture(base_layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if key in self._delta:
                self._base_out[key] = output  # W0 x as peft computed it: the outer hook reuses it

        return capture

    def _forward_hook(self, key: tuple[int, str]):
        def exact_delta(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            delta = self._delta.get(key)
            if delta is None:
                return output
            x = args[0]
            # peft rounds W0 x + s B A x to bf16 at the end of its forward, so adding s R x after it still
            # rounds the adapter's part: fedex and svd (the same s (R + B A), split differently) would differ.
            # The layer's output is recomputed as bf16 W0 x (identical in every mode) plus the whole change
            # s (B A + R) x in float32, so only float32 rounding separates two splits of the same product.
            # A peft layer's W0 x is the one its base layer produced inside this forward (captured by a hook
            # on the base layer, so it is not computed twice); a plain layer's output is W0 x already.
            base = self._base_out.pop(key, None)
            if base is None:
                base = layer.base_layer(x) if hasattr(layer, "base_layer") else output
            with torch.autocast(device_type=x.device.type, enabled=False):
                x32 = x.float()
                change = torch.nn.functional.linear(x32, delta)  # s R x
                change = change + adapter_change(layer, x32)  # s B A x
            return base.float() + change  # stays float32: rounding it to bf16 would undo the point

        return exact_delta


def adapter_change(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | float:
    """s B A x of a peft LoRA layer's active adapters, in the dtype of ``x`` (0.0 for a plain layer)."""
    if not hasattr(layer, "lora_A"):
        return 0.0
    if getattr(layer, "merged", False):
        raise ValueError("exact LoRA aggregation under bf16 needs unmerged adapters (the residual hook adds B A)")
    total: torch.Tensor | float = 0.0
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name], layer.lora_B[name]
        h = torch.nn.functional.linear(layer.lora_dropout[name](x), a.weight.float())
        total = total + torch.nn.functional.linear(h, b.weight.float()) * layer.scaling[name]
    return total


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The frozen base weight of a LoRA layer (peft's ``base_layer``), or the layer's own weight."""
    return layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight


def scaled_residual(model: torch.nn.Module, module_name: str, residual: np.ndarray) -> torch.Tensor:
    """s R laid out like the layer's base weight (float32): what is added to W0."""
    layer = model.get_submodule(module_name)
    scaling = layer.scaling
    if isinstance(scaling, dict):
        if len(scaling) != 1:
            raise ValueError(f"{module_name}: exact LoRA aggregation supports one adapter, found {len(scaling)}")
        scaling = next(iter(scaling.values()))
    update = torch.from_numpy(np.array(residual, dtype=np.float32)) * float(scaling)  # a copy: may be read-only
    if getattr(layer, "fan_in_fan_out", False):
        update = update.T  # GPT-2 style Conv1D stores (in, out)
    weight = base_weight(layer)
    if tuple(update.shape) != tuple(weight.shape):
        raise ValueError(f"{module_name}: residual of shape {tuple(update.shape)} for a weight {tuple(weight.shape)}")
    return update
