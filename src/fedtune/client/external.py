"""A client worker whose local training is the user's own loop (``fedtune.participate``).

``ExternalWorker`` answers the same fit and evaluate requests as ``ClientWorker``, so the in-process
transport and the gRPC participant drive it unchanged. A fit loads the global model into the user's module
and hands a ``Job`` to the user's thread (a queue); the transport's thread waits until the user's loop has
trained and called ``job.send(num_examples)``, then replies with the change of the trainable vector, through
the same update transforms as the built-in loop (DP clipping of the update; secure aggregation happens in the
participant, after the reply). What only the built-in loop can do is refused by ``check_external``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune.client.hooks import LoraResidual
from fedtune.client.residual_copy import ResidualCopy
from fedtune.client.weights import TrainableView
from fedtune.config.schema import ClientConfig, Config
from fedtune.core.messages import ClientEval, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.tasks.base import EvalSums, Task

# evaluate(model, client_id) -> {"loss": mean, "accuracy": mean (optional), "num_examples": count}
ExternalEval = Callable[[torch.nn.Module, str], Mapping[str, float]]
UpdateTransform = Callable[[ClientUpdate, FitInstruction], ClientUpdate]


class Abandoned(BaseException):
    """The user's loop stopped taking jobs: unwinds the transport's thread past its per-client error handling."""


def check_external(config: Config) -> None:
    """Refuse what needs fedtune's own local loop (it would silently not happen in the user's loop)."""
    s, p = config.server, config.privacy
    needs_loop = {
        "server.proximal_mu > 0 (FedProx adds a proximal term to every local loss)": s.proximal_mu > 0,
        "server.scaffold (SCAFFOLD corrects every local gradient)": s.scaffold,
        "privacy.dpsgd (DP-SGD clips and noises every step's per-example gradients)": p.dpsgd is not None,
        "client.straggler_fraction > 0 (stragglers stop the local loop early)": config.client.straggler_fraction > 0,
        f"server.lora_aggregation {s.lora_aggregation!r} (each client trains at its own LoRA rank in local steps)": (
            s.lora_aggregation in ("flora", "hetlora", "flexlora")
        ),
        "personalization (each client's own parameters and models are kept by fedtune's worker)": (
            config.personalization.active
        ),
    }
    refused = [what for what, on in needs_loop.items() if on]
    if refused:
        raise ConfigError(
            "your own training loop cannot apply " + "; ".join(refused) + ": these act inside fedtune's local loop. "
            "Use fedtune.simulate / fedtune client (the built-in loop) for them, or turn them off"
        )


@dataclass
class Job:
    """One round's local training for one client: train ``model`` (it holds the global model), then
    ``send(num_examples)``."""

    client_id: str
    round: int
    model: torch.nn.Module
    config: ClientConfig  # the federation's client section (lr, local_steps, batch_size, ...) for reference
    num_examples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _abandoned: bool = field(default=False, repr=False)

    def send(self, num_examples: int, metrics: Mapping[str, float] | None = None) -> None:
        """Send the trained model back; ``num_examples`` weights it in FedAvg (your local training set size)."""
        if self._done.is_set():
            raise RuntimeError(f"round {self.round} of {self.client_id} was already sent")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        self.num_examples = num_examples
        self.metrics = {k: float(v) for k, v in (metrics or {}).items()}
        self._done.set()

    def abandon(self) -> None:
        self._abandoned = True
        self._done.set()

    @property
    def sent(self) -> bool:
        return self._done.is_set() and not self._abandoned


class ExternalWorker:
    def __init__(
        self,
        task: Task,
        client_ids: Sequence[str],
        *,
        update_transforms: Sequence[UpdateTransform] = (),
        evaluate: ExternalEval | None = None,
        jobs: queue.Queue[Job | None],
        closed: threading.Event,
        residual_state: str | None = None,
    ) -> None:
        """``jobs`` is where fits hand their Job to the user's loop; once ``closed`` is set no job is taken.
        ``residual_state``: the store address where each client keeps its copy of the exact LoRA modes' residual
        (a deployed participant's own disk, so a restarted process keeps it); None: in memory."""
        self.task = task
        self.view = TrainableView(task.module)
        self.records: dict[str, tuple[list[Any], list[Any]]] = {cid: ([], []) for cid in client_ids}
        self.update_transforms = list(update_transforms)
        self.evaluate_fn = evaluate
        self.jobs = jobs
        self.residual = LoraResidual()
        self.residual_copy = ResidualCopy(residual_state)  # each client's residual, advanced by increments
        self._closed = closed

    def _check_digest(self, digest: str) -> None:
        if digest != self.view.spec.digest:
            raise UpdateRejected(
                f"the server's model spec {digest} differs from this client's {self.view.spec.digest}: "
                "your model must have the trainable parameters (names and shapes) of the server's"
            )

    def fit(self, instr: FitInstruction) -> ClientUpdate:
        if self._closed.is_set():
            raise Abandoned
        self._check_digest(instr.spec_digest)
        self.view.write(instr.params)
        self.residual.load(
            self.task.module, self.residual_copy.resolve(instr.client_id, instr.extras, round=instr.round)
        )
        self.task.module.train()
        job = Job(instr.client_id, instr.round, self.task.module, instr.train)
        started = time.perf_counter()
        self.jobs.put(job)
        job._done.wait()
        seconds = time.perf_counter() - started  # the user's loop, from handing the job out to send()
        if job._abandoned or self._closed.is_set():
            raise Abandoned
        update = ClientUpdate(
            client_id=instr.client_id,
            round=instr.round,
            num_examples=int(job.num_examples or 0),
            delta=self.view.read() - instr.params,
            spec_digest=self.view.spec.digest,
            metrics={"fit_seconds": seconds, **job.metrics},
            version=instr.version,
        )
        for transform in self.update_transforms:
            update = transform(update, instr)
        return update

    def evaluate(self, instr: EvalInstruction) -> ClientEval:
        """The user's evaluate function on the global model, or nothing to report without one."""
        self._check_digest(instr.spec_digest)
        if self.evaluate_fn is None:
            return ClientEval(instr.client_id, instr.round, EvalSums())
        self.view.write(instr.params)
        module = self.task.module
        extras = self.residual_copy.resolve(instr.client_id, instr.extras, round=instr.round + 1, keep=False)
        with self.residual.applied(module, extras), torch.no_grad():
            was_training = module.training
            module.eval()
            try:
                metrics = self.evaluate_fn(module, instr.client_id)
            finally:
                module.train(was_training)
        return ClientEval(instr.client_id, instr.round, eval_sums(metrics))

    def current_params(self) -> Any:
        return self.view.read()


def eval_sums(metrics: Mapping[str, float]) -> EvalSums:
    """The user's means (loss, accuracy) over ``num_examples`` as additive sums."""
    missing = {"loss", "num_examples"} - set(metrics)
    if missing:
        raise ValueError(f"evaluate(model, client_id) must return loss and num_examples; missing {sorted(missing)}")
    n = int(metrics["num_examples"])
    correct = round(float(metrics["accuracy"]) * n) if "accuracy" in metrics else 0
    return EvalSums(loss_sum=float(metrics["loss"]) * n, count=n, correct=correct, examples=n)
