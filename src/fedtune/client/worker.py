"""A client worker: one resident model that serves fit and evaluate requests for any of its clients.

In the simulation one worker holds every simulated client's data and swaps the trainable vector per
request, so memory does not grow with the number of clients. A deployed participant is the same worker
holding only its own data.

The global model a request describes is its trainable vector plus, in the exact LoRA modes (fedex, svd,
flora), a residual per adapted layer in ``extras``. Fit and evaluation load both the same way
(``LoraResidual.load``), so evaluation sees exactly the model the server aggregated.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedtune.client.hooks import LoraResidual
from fedtune.client.personal import Personalizer
from fedtune.client.residual_copy import ResidualCopy
from fedtune.client.train import WHOLE_BATCH, BatchLoss, LocalResult, LocalRun, StepCallback, local_train
from fedtune.client.weights import TrainableView
from fedtune.core.fit import FitContext, LocalHooks
from fedtune.core.keys import ROUNDS_OPTION
from fedtune.core.messages import ClientEval, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.rng import derive_rng
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.tasks.base import EvalSums, Example, Task

# (task, instruction, view) -> this fit's hooks (fedtune.core.fit); strategies add local terms without subclassing
HookFactory = Callable[[Task, FitInstruction, TrainableView], LocalHooks]


def evaluate_examples(task: Task, examples: Sequence[Example], batch_size: int) -> EvalSums:
    """Summed evaluation statistics of the task's current weights over ``examples``."""
    total = EvalSums()
    task.module.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            total = total + task.eval_batch(task.collate(examples[start : start + batch_size]))
    return total


def _throughput(result: LocalResult) -> dict[str, float]:
    """Examples per second of local training, for the server's progress line and the per-client records."""
    return {"examples_per_s": result.examples_per_s} if result.examples_per_s > 0 else {}


class ClientWorker:
    def __init__(
        self,
        task: Task,
        records: Mapping[str, tuple[Sequence[Any], Sequence[Any]]],
        *,
        hook_factories: Sequence[HookFactory] = (),
        update_transforms: Sequence[Callable[[ClientUpdate, FitInstruction], ClientUpdate]] = (),
        personal: Personalizer | None = None,
        residual_state: str | None = None,
    ) -> None:
        """``records`` maps client id -> (train records, test records); ``personal``: what each client keeps
        for itself (fedtune.client.personal), None without personalisation; ``residual_state``: the client
        state store where each client keeps its copy of the LoRA residual (None: in this worker's memory)."""
        self.task = task
        self.view = TrainableView(task.module)
        self.records = records
        self.hook_factories = list(hook_factories)
        self.update_transforms = list(update_transforms)
        self.personal = personal
        self._encoded: dict[tuple[str, bool], list[Example]] = {}
        # inert unless a request carries "lora/residual/<module>" arrays; under bf16 autocast the residual is
        # applied in float32 beside the base weight instead of folded into it (where bf16 would round it away)
        bf16 = task.compute_dtype != "float32"
        self.residual = LoraResidual(separate=bf16)
        self.residual_copy = ResidualCopy(residual_state)  # the client's residual, advanced by increments
        self.on_step: StepCallback | None = None  # told after every local step (the simulation's progress bar)

    def examples(self, client_id: str, *, train: bool) -> list[Example]:
        """Encoded examples of one client, tokenised once and cached."""
        key = (client_id, train)
        if key not in self._encoded:
            if client_id not in self.records:
                raise KeyError(f"unknown client {client_id!r}")
            train_records, test_records = self.records[client_id]
            self._encoded[key] = self.task.encode(train_records if train else test_records, train=train)
        return self._encoded[key]

    def _check_digest(self, digest: str) -> None:
        if digest != self.view.spec.digest:
            raise UpdateRejected(
                f"the server's model spec {digest} differs from this client's {self.view.spec.digest}: "
                "server and client must use the same model and adapter configuration"
            )

    def begin_fit(self, instr: FitInstruction) -> FitContext:
        """Check the spec, load the global model, and gather this fit's hooks. The caller must ``close`` the
        context when the fit ends (``ClientWorker.fitting`` does), whether it succeeded or not."""
        self._check_digest(instr.spec_digest)
        self.view.write(instr.params)
        extras = self.residual_copy.resolve(instr.client_id, instr.extras, round=instr.round)
        self.residual.load(self.task.module, extras)  # base weights before any hook looks at the model
        fit = FitContext(instr)
        try:
            for factory in self.hook_factories:
                fit.hooks.extend(factory(self.task, instr, self.view))
        except BaseException:
            fit.close()  # the factories that did run may have left something to undo
            raise
        return fit

    @contextmanager
    def fitting(self, instr: FitInstruction) -> Iterator[FitContext]:
        """``begin_fit`` ... ``close``: whatever the fit's hooks left on the model or the extensions is undone
        however the fit ends, so a failed fit leaves this worker as a fresh one would be."""
        fit = self.begin_fit(instr)
        try:
            yield fit
        finally:
            fit.close()

    def finish(self, fit: FitContext, update: ClientUpdate) -> ClientUpdate:
        """The reply that is sent: the fit's own finishes (last registered first), then the worker's
        stateless update transforms in order (the DP clip last: what leaves the client is what is bounded)."""
        update = fit.finish(update)
        for transform in self.update_transforms:
            update = transform(update, fit.instr)
        return update

    def reply(self, instr: FitInstruction, result: LocalResult, params: np.ndarray, metrics: dict) -> ClientUpdate:
        """The update before transforms: ``params`` are the trained values (a fresh vector, which becomes the
        delta in place: one model-sized buffer per reply, not two), ``metrics`` extra figures."""
        return ClientUpdate(
            client_id=instr.client_id,
            round=instr.round,
            num_examples=result.num_examples,
            delta=np.subtract(params, instr.params, out=params),
            spec_digest=self.view.spec.digest,
            version=instr.version,  # async mode: the model version it trained on, echoed
            metrics={"train_loss": result.train_loss, "steps": float(result.steps), **_throughput(result), **metrics},
        )

    def train(self, fit: FitContext, *, batch_loss: BatchLoss = WHOLE_BATCH) -> LocalResult:
        """The local training of the fit's client on its examples (data-parallel ranks pass their batch loss)."""
        instr, cfg = fit.instr, fit.instr.train
        run = LocalRun(instr.seed, instr.round, instr.client_id, rounds=instr.options.get(ROUNDS_OPTION))
        examples = self.examples(instr.client_id, train=True)
        if cfg.trainer == "hf":
            from fedtune.client.hf_trainer import hf_local_train

            if batch_loss is not WHOLE_BATCH:
                raise ConfigError(
                    "client.trainer 'hf' trains in one process: data-parallel local training (client_nproc / "
                    "--nproc > 1) needs client.trainer 'builtin'"
                )
            return hf_local_train(self.task, examples, cfg, run, hooks=fit.hooks)
        return local_train(self.task, examples, cfg, run, hooks=fit.hooks, batch_loss=batch_loss, on_step=self.on_step)

    def fit(self, instr: FitInstruction) -> ClientUpdate:
        started = time.perf_counter()
        with self.fitting(instr) as fit:
            if self.personal is None:
                result, params, extra = self.train(fit), self.view.read(), {}
            else:  # the client's own parameters around the global update (saved in its state store)
                examples = self.examples(instr.client_id, train=True)
                trainer = functools.partial(self.train, fit)
                result, params, extra = self.personal.fit(self.task, self.view, instr, instr.train, trainer, examples)
            update = self.reply(instr, result, params, {"fit_seconds": time.perf_counter() - started, **extra})
            return self.finish(fit, update)

    def evaluate(self, instr: EvalInstruction) -> ClientEval:
        self._check_digest(instr.spec_digest)
        self.view.write(instr.params)
        examples = self.examples(instr.client_id, train=False)
        if instr.max_examples is not None and len(examples) > instr.max_examples:
            # a fixed, seeded subset so every round evaluates the same examples
            keep = derive_rng(0, "eval-subset", instr.client_id).choice(
                len(examples), instr.max_examples, replace=False
            )
            examples = [examples[i] for i in sorted(keep.tolist())]
        personal: dict[str, EvalSums] = {}
        # the copy this client's fit of round ``instr.round`` kept (if it fitted then), advanced, not saved
        extras = self.residual_copy.resolve(instr.client_id, instr.extras, round=instr.round + 1, keep=False)
        with self.residual.applied(self.task.module, extras):  # W0 restored afterwards
            sums = evaluate_examples(self.task, examples, instr.batch_size)
            if self.personal is not None:  # the client's own models on the same examples
                personal = self.personal.evaluate(
                    self.task,
                    self.view,
                    instr,
                    lambda held_out: evaluate_examples(self.task, held_out, instr.batch_size),
                    examples,
                    lambda: self.examples(instr.client_id, train=True),
                )
        return ClientEval(instr.client_id, instr.round, sums, personal)

    def current_params(self) -> np.ndarray:
        return self.view.read()

    def close(self) -> None:
        """Nothing to release (a data-parallel worker stops its ranks here): every worker can be closed."""
