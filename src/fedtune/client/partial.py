"""Partial work at the round deadline (FedProx's system heterogeneity, Li et al. 2020, over a real network).

With ``deployment.partial_work`` the gRPC server sends each fit a time budget (``partial_work_share`` of
``round_timeout_s``, the rest left for the upload). A participant that spends it stops local training after the
step in progress and sends what it has instead of missing the deadline and being dropped. At least one step is
always taken. The reply is weighted by the work done: its example count becomes
``max(1, round(n_k x steps done / steps planned))``, so under example weighting a client that did a third of
its steps counts a third as much; the metrics line says ``partial_work: 1`` with ``steps`` and ``steps_planned``.

The budget runs from when the client starts the fit (the download and any queueing before it are what the
share leaves room for). Data-parallel ranks (``--nproc > 1``) would each stop at their own time and leave the
others waiting in an all-reduce, so the budget is ignored there (with a warning); so is it by
``client.trainer: hf`` (transformers.Trainer's loop cannot be stopped from a hook).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from fedtune.client.train import micro_batches_per_round
from fedtune.client.weights import TrainableView
from fedtune.config.deployment import TIME_BUDGET_OPTION as BUDGET_OPTION
from fedtune.core.fit import LocalHooks
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.tasks.base import Task

log = logging.getLogger("fedtune")


def time_budget(
    task: Task, instr: FitInstruction, view: TrainableView, *, clock: Callable[[], float] = time.monotonic
) -> LocalHooks:
    """A stop check that ends local training once the instruction's time budget is spent (inert without one)."""
    budget = instr.options.get(BUDGET_OPTION)
    if budget is None:
        return LocalHooks()
    if instr.train.trainer == "hf":
        log.warning(
            "deployment.partial_work: client.trainer 'hf' runs transformers.Trainer's loop, which cannot stop early"
        )
        return LocalHooks()
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        log.warning("deployment.partial_work: the time budget is ignored by data-parallel ranks (--nproc > 1)")
        return LocalHooks()
    deadline = clock() + float(budget)
    return LocalHooks(stop_checks=[lambda: clock() >= deadline], finish=[lambda update: weight_by_work(update, instr)])


def planned_steps(instr: FitInstruction, num_examples: int) -> int:
    cfg = instr.train
    batch = num_examples if cfg.full_batch else cfg.batch_size
    return math.ceil(micro_batches_per_round(cfg, num_examples, batch) / cfg.gradient_accumulation_steps)


def weight_by_work(update: ClientUpdate, instr: FitInstruction) -> ClientUpdate:
    """The reply of a fit the budget cut short, weighted by the steps it did; any other reply unchanged."""
    if instr.options.get(BUDGET_OPTION) is None:
        return update
    done, planned = int(update.metrics.get("steps", 0)), planned_steps(instr, update.num_examples)
    if done <= 0 or done >= planned:
        return update
    examples = max(1, round(update.num_examples * done / planned))
    metrics = {**update.metrics, "partial_work": 1.0, "steps_planned": float(planned)}
    return replace(update, num_examples=examples, metrics=metrics)
