"""Local training: E epochs or S steps of minibatch SGD/AdamW on one client's examples.

Reads top to bottom like nanoGPT's loop. Strategy-specific local behaviour (FedProx's proximal term,
SCAFFOLD's gradient correction, DP-SGD) plugs in through ``LocalHooks`` rather than subclasses. How each
global batch becomes the loss to differentiate is the one other seam (``BatchLoss``): the whole batch in
this process (``WholeBatch``), or this rank's shard of it under data parallelism
(``fedtune.client.distributed.RankShard``); the loop itself exists once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from fedtune.client.schedule import round_schedule
from fedtune.config.schema import ClientConfig
from fedtune.core.events import StepProgress
from fedtune.core.fit import LocalHooks
from fedtune.core.rng import derive_seed, derive_torch_generator, seed_device_stream
from fedtune.tasks.base import Example, Task

StepCallback = Callable[[StepProgress], None]  # told after every optimizer step (progress displays)


class BatchLoss(Protocol):
    """How one step turns a global batch into (the loss to differentiate, the batch's mean task loss)."""

    # appended to the dropout stream's scope: data-parallel ranks each draw their own dropout masks
    rng_scope: tuple[object, ...]

    def __call__(self, task: Task, examples: list[Example]) -> tuple[torch.Tensor, float]: ...


@dataclass(frozen=True)
class WholeBatch:
    """One process computes the step on the whole batch."""

    rng_scope: tuple[object, ...] = ()

    def __call__(self, task: Task, examples: list[Example]) -> tuple[torch.Tensor, float]:
        loss, _ = task.loss(task.collate(examples))
        return loss, float(loss.detach())


WHOLE_BATCH = WholeBatch()


@dataclass(frozen=True)
class LocalResult:
    num_examples: int  # training examples the client holds (FedAvg's n_k)
    steps: int
    train_loss: float  # mean over steps of the task loss (without extra terms)
    examples_per_s: float = 0.0  # training examples processed per second of local training (0: not measured)


@dataclass(frozen=True)
class LocalRun:
    """Which client's round a local training is: what every local trainer (this loop, the Trainer path in
    fedtune.client.hf_trainer) takes besides the task, the examples and the client config."""

    seed: int  # the run's seed: shuffling and dropout derive from (seed, round_idx, client_id)
    round_idx: int
    client_id: str
    rounds: int | None = None  # the federation's rounds: the learning-rate schedule's horizon (None: one round)


def _batches(examples: Sequence[Example], batch_size: int, generator: torch.Generator) -> Iterator[list[Example]]:
    """Shuffled minibatches, epoch after epoch; the last partial batch of an epoch is kept (small clients
    matter)."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def make_optimizer(params: list[torch.nn.Parameter], cfg: ClientConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def micro_batches_per_round(cfg: ClientConfig, num_examples: int, batch_size: int) -> int:
    """Minibatches one round computes: local_steps x accumulation, or local_epochs passes over the data."""
    if cfg.local_steps is not None:
        return cfg.local_steps * cfg.gradient_accumulation_steps
    return cfg.local_epochs * math.ceil(num_examples / batch_size)  # type: ignore[operator]


def local_train(
    task: Task,
    examples: Sequence[Example],
    cfg: ClientConfig,
    run: LocalRun,
    *,
    hooks: LocalHooks | None = None,
    batch_loss: BatchLoss = WHOLE_BATCH,
    on_step: StepCallback | None = None,
) -> LocalResult:
    """Train ``task.module``'s trainable parameters in place on ``examples``.

    An optimizer step accumulates ``cfg.gradient_accumulation_steps`` minibatches (each one's loss divided
    by their count, as transformers.Trainer does); the learning rate follows ``cfg.lr_scheduler_type`` over
    the federation's ``run.rounds`` (see fedtune.client.schedule). ``task.module`` may be a wrapper while this
    runs (DDP): the parameters are read from it, and its forward is what ``task.loss`` calls. ``on_step``
    hears about every finished step (a progress bar)."""
    seed, round_idx, client_id = run.seed, run.round_idx, run.client_id
    if not examples:
        raise ValueError(f"client {client_id} has no training examples")
    hooks = hooks or LocalHooks()
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    batch_size = len(examples) if cfg.full_batch else cfg.batch_size
    # Shuffling and dropout both draw from streams derived from (seed, round, client): a resumed run
    # replays exactly the same minibatches.
    shuffle = derive_torch_generator(seed, "shuffle", round_idx, client_id)
    # dropout: the default generator of the device the parameters live on (dropout takes no generator)
    seed_device_stream(derive_seed(seed, "dropout", round_idx, client_id, *batch_loss.rng_scope), params[0].device)
    micro_total = micro_batches_per_round(cfg, len(examples), batch_size)
    accumulate = cfg.gradient_accumulation_steps
    total_steps = math.ceil(micro_total / accumulate)
    schedule = round_schedule(cfg, steps_per_round=total_steps, round_idx=round_idx, rounds=run.rounds)

    task.module.train()
    batches = _batches(examples, batch_size, shuffle)
    losses: list[float] = []
    started, seen = time.perf_counter(), 0
    for step in range(total_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * schedule.factor(step)
        optimizer.zero_grad(set_to_none=True)
        micro = min(accumulate, micro_total - step * accumulate)  # the last step of an epoch run may be short
        step_loss = 0.0
        for _ in range(micro):
            batch_examples = next(batches)
            total, reported = batch_loss(task, batch_examples)
            for term in hooks.loss_terms:
                total = total + term()
            (total / micro if micro > 1 else total).backward()
            step_loss += reported / micro
            seen += len(batch_examples)
        for hook in hooks.grad_hooks:
            hook()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
        if on_step is not None:
            elapsed = time.perf_counter() - started
            on_step(StepProgress(client_id, round_idx, len(losses), total_steps, seen, elapsed))
        if any(check() for check in hooks.stop_checks):  # e.g. the round's deadline: send the partial work
            break
    task.module.eval()
    elapsed = time.perf_counter() - started
    return LocalResult(
        num_examples=len(examples),
        steps=len(losses),
        train_loss=sum(losses) / len(losses),
        examples_per_s=seen / elapsed if elapsed > 0 else 0.0,
    )
