"""Local DP-SGD (Abadi et al. 2016) on a client's trainable parameters, as a client hook, via Opacus.

Each local step, after the task's backward pass:

    g_i   per-example gradients of every trainable (LoRA) parameter   Opacus GradSampleHooks
          -> checked: every trainable parameter has one of batch length (else PrivacyError)
          -> normalised to example i's own mean loss (causal LM: the batch loss is token-weighted)
    keep  Poisson mask, each example with probability q               only with client.full_batch
    S     = sum_i clip(g_i, C)                                         Opacus DPOptimizer.clip_and_accumulate
    grad  = (S + N(0, (z C)^2 I)) / expected batch size                fedtune.privacy.noise (seeded or secure)

The hook runs before any other gradient hook, so strategy hooks (FFA's frozen A, FLoRA's rank mask)
post-process the private gradient. Accounting (fedtune.privacy.accountant):

* full batch + Poisson mask: each step is a Poisson-subsampled Gaussian (q, z), add/remove adjacency;
* shuffled minibatches: an example is in one batch per epoch touched, and shuffling amplifies nothing
  provably, so each touched epoch is one Gaussian mechanism with sensitivity 2C (replace-one adjacency);
  the epochs touched are counted from the examples the steps saw (ceil(seen / N)), exact for any N and B.

The per-client epsilon is reported in the update's metrics: ``dpsgd_epsilon_round`` (this round's local
training) and ``dpsgd_epsilon`` (all of this client's rounds so far). The ledger behind the latter is the
client's, not the worker's: it is loaded from the client state store (``fedtune.core.state_store``,
namespace "dpsgd") when the client's fit starts and saved with this round's entries when it ends, so it is
the same whichever worker, Ray actor or resumed process serves the client; a round replayed after a crash
reads the ledger it read the first time (the store is versioned by round).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer

from fedtune.config.privacy import DpSgdConfig
from fedtune.core.fit import LocalHooks
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.core.state_store import ClientState, ClientStateStore, open_state_store
from fedtune.models.lora import trainable_parameters
from fedtune.privacy import accountant
from fedtune.privacy.errors import PrivacyError
from fedtune.privacy.noise import gaussian, noise_generator
from fedtune.tasks.base import Task

# Opacus registers full backward hooks on every trainable layer; on a first layer whose input needs no
# gradient, torch warns that the hook sees only output gradients, which is all Opacus uses.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
)

STATE_NAMESPACE = "dpsgd"  # the ledger's key in the client state store, beside other mechanisms' state


@dataclass
class _Batch:
    """What the last training forward pass saw: batch size and (causal LM) attention lengths."""

    size: int = 0
    lengths: torch.Tensor | None = None


@dataclass
class _Attachment:
    hooks: GradSampleHooks
    batch: _Batch
    names: list[str]
    params: list[torch.nn.Parameter]


@dataclass
class _Fit:
    ledger: list[dict]  # the client's ledger before this round, as loaded from the store
    steps: int = 0
    full_batch: bool = False
    seen: int = 0  # examples in all of this fit's batches: each epoch covers the data set once
    kept: list[int] = field(default_factory=list)


def _capture(batch: _Batch):
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(first, torch.Tensor) and module.training and torch.is_grad_enabled():
            batch.size = int(first.shape[0])
            mask = kwargs.get("attention_mask")
            batch.lengths = mask.sum(dim=1) if isinstance(mask, torch.Tensor) else None

    return hook


def example_scale(task: Task, batch: _Batch) -> torch.Tensor:
    """Per-example factors turning Opacus' per-sample gradients into gradients of each example's own
    mean loss. Opacus ('mean' reduction) multiplies the batch loss's gradient by B; for a token-weighted
    causal-LM loss (sum over all T counted tokens / T) that leaves a factor B n_i / T on example i, which
    couples examples through T. Dividing it out makes each g_i depend on example i alone."""
    if task.kind != "causal_lm":
        return torch.ones(batch.size)  # example-mean losses: Opacus' per-sample gradients are already exact
    if batch.lengths is None:
        raise PrivacyError("DP-SGD on a causal LM needs the attention mask of each batch to normalise per example")
    counted = (batch.lengths - 1).clamp(min=1).to(torch.float64)  # plain text: every token but the first
    return (counted.sum() / (batch.size * counted)).to(torch.float32)


def epochs_touched(seen: int, num_examples: int) -> int:
    """Epochs a run of shuffled minibatches touched, from the examples its batches held in all.

    >>> epochs_touched(16 * 10 - 16, 72), epochs_touched(142, 72), epochs_touched(1, 72)  # 16, 15, 1 steps
    (2, 2, 1)
    """
    if num_examples < 1:
        raise PrivacyError("DP-SGD: a client with no examples cannot be accounted")
    return math.ceil(seen / num_examples)


class DpSgd:
    """Hook factory for local DP-SGD (its hooks carry the fit's bookkeeping and finish). Each client's
    ledger lives in the client state store at ``state`` (an address, opened on first use in whichever
    process this object was built: a Ray actor, a data-parallel rank)."""

    def __init__(self, cfg: DpSgdConfig, *, state: str, seed_scope: str = "dpsgd") -> None:
        self.cfg = cfg
        self.state = state
        self.scope = seed_scope
        self._attached: weakref.WeakKeyDictionary[torch.nn.Module, _Attachment] = weakref.WeakKeyDictionary()

    @functools.cached_property
    def store(self) -> ClientStateStore:
        return open_state_store(self.state)

    def ledger(self, client_id: str, *, round: int) -> list[dict]:
        """The client's ledger as a fit of ``round`` starts: every entry saved in earlier rounds."""
        saved = self.store.load(client_id, STATE_NAMESPACE, round=round)
        return list(saved.meta["ledger"]) if saved is not None else []

    def _attach(self, task: Task) -> _Attachment:
        module = task.module
        if module not in self._attached:
            named = list(trainable_parameters(module).items())
            batch = _Batch()
            module.register_forward_pre_hook(_capture(batch), with_kwargs=True)
            # strict=False: base models carry buffers (rotary tables); a parameter Opacus cannot handle is
            # caught by the per-step check below instead of being skipped silently
            hooks = GradSampleHooks(module, batch_first=True, loss_reduction="mean", strict=False)
            self._attached[module] = _Attachment(hooks, batch, [n for n, _ in named], [p for _, p in named])
        return self._attached[module]

    def hooks(self, task: Task, instr: FitInstruction, view: object) -> LocalHooks:
        """This fit's private-gradient hook, the finish that books its cost, and the cleanup that drops any
        per-sample gradient a failed step left on the parameters (Opacus would add the next batch's to it).
        ``view`` is unused: DP-SGD clips every trainable parameter of ``task.module``."""
        att = self._attach(task)
        full_batch = instr.train.full_batch
        if full_batch != (self.cfg.sample_rate is not None):
            raise PrivacyError("privacy.dpsgd.sample_rate is required with, and only with, client.full_batch")
        fit = _Fit(self.ledger(instr.client_id, round=instr.round), full_batch=full_batch)
        clipper = DPOptimizer(
            torch.optim.SGD(att.params, lr=0.0),
            noise_multiplier=0.0,  # the noise is ours (seeded or secure); Opacus clips
            max_grad_norm=self.cfg.max_grad_norm,
            expected_batch_size=1,
        )

        def private_gradient() -> None:
            self._step(task, att, clipper, fit, instr)

        def finish(update: ClientUpdate) -> ClientUpdate:
            return self.book(fit, update)

        def cleanup() -> None:
            for p in att.params:
                p.grad_sample, p.summed_grad = None, None
            att.batch.size, att.batch.lengths = 0, None

        return LocalHooks(grad_hooks=[private_gradient], finish=[finish], cleanup=[cleanup])

    def _check(self, att: _Attachment) -> int:
        size = att.batch.size
        for name, p in zip(att.names, att.params, strict=True):
            gs = getattr(p, "grad_sample", None)
            if not isinstance(gs, torch.Tensor) or gs.shape[0] != size or gs.shape[1:] != p.shape:
                got = tuple(gs.shape) if isinstance(gs, torch.Tensor) else type(gs).__name__
                raise PrivacyError(
                    f"DP-SGD: trainable parameter {name!r} received no per-sample gradient for this batch "
                    f"(got {got}, batch {size}); Opacus cannot see how this layer uses it, so its gradient "
                    "could not be clipped per example"
                )
        return size

    def _step(self, task: Task, att: _Attachment, clipper: DPOptimizer, fit: _Fit, instr: FitInstruction) -> None:
        size = self._check(att)
        scale = example_scale(task, att.batch)
        scope = (self.scope, instr.round, instr.client_id, fit.steps)
        if fit.full_batch:
            q = float(self.cfg.sample_rate)  # type: ignore[arg-type]
            draws = noise_generator(seed=instr.seed, scope=(*scope, "sample"), secure=self.cfg.secure_rng).random(size)
            keep = torch.from_numpy(np.asarray(draws) < q)
            scale = scale * keep
            expected = q * size  # full batch: size is the client's data set size (public, as in Opacus)
            fit.kept.append(int(keep.sum()))
        else:
            expected = float(size)
        for p in att.params:
            p.grad_sample = p.grad_sample * scale.view(-1, *([1] * p.dim())).to(p.grad_sample.dtype)
        clipper.clip_and_accumulate()
        numel = sum(p.numel() for p in att.params)
        std = self.cfg.noise_multiplier * self.cfg.max_grad_norm
        noise = torch.from_numpy(
            gaussian(numel, std, seed=instr.seed, scope=(*scope, "noise"), secure=self.cfg.secure_rng)
        )
        offset = 0
        for p in att.params:
            n = p.numel()
            summed = p.summed_grad + noise[offset : offset + n].view_as(p).to(p.dtype)
            p.grad = summed / expected
            offset += n
            p.grad_sample, p.summed_grad = None, None
        fit.steps += 1
        fit.seen += size

    def round_entries(self, fit: _Fit, num_examples: int) -> list[dict]:
        z = self.cfg.noise_multiplier
        if fit.steps == 0:
            return []
        if fit.full_batch:
            return [accountant.poisson_entry(float(self.cfg.sample_rate), z, fit.steps)]  # type: ignore[arg-type]
        # Local training walks whole shuffled epochs in order (the last batch of each may be partial), so
        # the steps touched ceil(examples seen / N) epochs, whatever the batch size and the last batch's
        return [accountant.gaussian_replace_entry(z, epochs_touched(fit.seen, num_examples))]

    def book(self, fit: _Fit, update: ClientUpdate) -> ClientUpdate:
        """Append this round's cost to the client's ledger, save it, and report epsilon in the metrics."""
        entries = self.round_entries(fit, update.num_examples)
        ledger = fit.ledger
        for entry in entries:
            ledger = accountant.append(ledger, entry)
        # saved before the update leaves: an update sent is a release, and its cost must be on record
        self.store.save(update.client_id, STATE_NAMESPACE, ClientState(meta={"ledger": ledger}), round=update.round)
        delta = self.cfg.delta
        metrics = {
            **update.metrics,
            "dpsgd_epsilon_round": accountant.epsilon(entries, delta) if entries else 0.0,
            "dpsgd_epsilon": accountant.epsilon(ledger, delta),
            "dpsgd_steps": float(fit.steps),
        }
        return replace(update, metrics=metrics)
