"""What one local fit is made of, shared by the client's loop and the extensions that plug into it.

An extension (a strategy's client half, DP-SGD) is a factory called once per fit; it returns the
``LocalHooks`` of that fit: terms added to each step's loss, hooks run on the gradients before the optimizer
step, a ``finish`` applied to the reply, and a ``cleanup`` run when the fit ends. Whatever an extension must
remember between its hooks and its finish (a straggler's snapshot, DP-SGD's step count) lives in the
closures of that one object, never on the extension or on the model, so nothing outlives the fit.

``FitContext`` gathers every extension's hooks for one fit; the worker finishes it in a ``finally``, so a
fit that raises leaves nothing behind for the next one (Opacus' per-sample gradients included).

This module sits in ``core`` so that extensions outside ``fedtune.client`` (``fedtune.privacy.dpsgd``) need
not import the client package that imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedtune.core.messages import ClientUpdate, FitInstruction

LossTerm = Callable[[], torch.Tensor]  # extra differentiable loss added to each step's loss
GradHook = Callable[[], None]  # runs after backward, before the optimizer step (may edit .grad)
Finish = Callable[[ClientUpdate], ClientUpdate]  # turns this fit's reply into what is sent
Cleanup = Callable[[], None]  # undoes what the fit left on shared objects (runs on success and failure)


@dataclass
class LocalHooks:
    """One extension's part in one fit (or, gathered in a FitContext, every extension's)."""

    loss_terms: list[LossTerm] = field(default_factory=list)
    grad_hooks: list[GradHook] = field(default_factory=list)
    finish: list[Finish] = field(default_factory=list)
    cleanup: list[Cleanup] = field(default_factory=list)
    # asked after every step: True ends local training there (deployment.partial_work's deadline)
    stop_checks: list[Callable[[], bool]] = field(default_factory=list)

    def extend(self, other: LocalHooks) -> None:
        self.loss_terms += other.loss_terms
        self.grad_hooks += other.grad_hooks
        self.stop_checks += other.stop_checks
        self.finish += other.finish
        self.cleanup += other.cleanup


@dataclass
class FitContext:
    """One fit: its instruction and every extension's hooks, in the order the extensions were registered.

    Hooks run in registration order; finishes and cleanups run in reverse (the first extension registered
    wraps all the others: DP-SGD's hook sees the gradient first and its finish sees the reply last)."""

    instr: FitInstruction
    hooks: LocalHooks = field(default_factory=LocalHooks)
    closed: bool = False

    def finish(self, update: ClientUpdate) -> ClientUpdate:
        for step in reversed(self.hooks.finish):
            update = step(update)
        return update

    def close(self) -> None:
        """Run every cleanup once, all of them even if one raises (the first error is raised after)."""
        if self.closed:
            return
        self.closed = True
        error: BaseException | None = None
        for step in reversed(self.hooks.cleanup):
            try:
                step()
            except BaseException as err:
                error = error or err
        if error is not None:
            raise error
