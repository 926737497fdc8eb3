"""Data-parallel local training inside one participant: torch DistributedDataParallel over N processes.

A participant (a deployed client, ``fedtune client --nproc N``, or one simulated client with
``simulation.client_nproc: N``) trains on N local processes: gloo on CPU, NCCL with one GPU per rank. The
process that talks to the server starts the ranks once (``DDPFitter``) and relays each fit instruction to all
of them; only rank 0 replies, and only its update goes to the server.

Every rank builds the same worker (same model from the same seed, same data), draws the same minibatches as
``local_train`` (the same shuffle stream of (seed, round, client)) and trains on its contiguous shard of each
global batch. DDP averages gradients over ranks, and each rank's loss is scaled by ``n_rank * N / n_global``
(counted units: examples, or tokens for a language model), so the averaged gradient is exactly the gradient
of the global batch's mean loss, which is what one process computes on the whole batch, also for an uneven
last batch. A rank whose shard is empty (a batch smaller than N) runs one example with weight 0 so it still
joins the gradient all-reduce. Up to float rounding, the result equals a single-process run.

Limits: dropout masks differ from a single process (each rank draws its own); per-example hooks such as
DP-SGD's per-sample clipping see one rank's shard, so do not combine them with ``nproc > 1``; ranks run on
this machine only (several machines per participant need torchrun, not this launcher).

>>> # fitter = DDPFitter(functools.partial(worker_from_config, config), nproc=2)
>>> # update = fitter.fit(instruction); fitter.close()      # or: run_ddp_fit(factory, instruction, 2)
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fedtune.client.train import LocalHooks, LocalResult, _batches, make_optimizer
from fedtune.client.worker import ClientWorker
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import ClientEval, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.rng import derive_seed, derive_torch_generator
from fedtune.errors import FedtuneError
from fedtune.tasks.base import Example, Task

WorkerFactory = Callable[[], ClientWorker]  # picklable: every rank calls it in its own process
COLLECTIVE_TIMEOUT_S = 600  # a rank stuck this long in an all-reduce means another rank died


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous near-equal shard [start, stop) of ``n`` items for ``rank``.

    >>> [shard_bounds(5, r, 2) for r in range(2)]
    [(0, 3), (3, 5)]
    """
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


@contextlib.contextmanager
def _wrapped(task: Task, ddp: torch.nn.Module) -> Iterator[None]:
    """Let the task's own ``loss`` call the DDP wrapper (whose forward arms the gradient all-reduce)."""
    module = task.module
    task.module = ddp
    try:
        yield
    finally:
        task.module = module


def ddp_local_train(
    task: Task,
    ddp: torch.nn.Module,
    examples: Sequence[Example],
    cfg: ClientConfig,
    *,
    seed: int,
    round_idx: int,
    client_id: str,
    hooks: LocalHooks,
    device: torch.device,
) -> LocalResult:
    """``local_train`` on this rank's shard of each global batch; every rank must call it together."""
    if not examples:
        raise ValueError(f"client {client_id} has no training examples")
    rank, world = dist.get_rank(), dist.get_world_size()
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    batch_size = len(examples) if cfg.full_batch else cfg.batch_size
    shuffle = derive_torch_generator(seed, "shuffle", round_idx, client_id)  # the same stream as local_train
    torch.manual_seed(derive_seed(seed, "dropout", round_idx, client_id, "rank", rank))
    if cfg.local_steps is not None:
        total_steps = cfg.local_steps
    else:
        total_steps = cfg.local_epochs * math.ceil(len(examples) / batch_size)  # type: ignore[operator]

    task.module.train()
    losses: list[float] = []
    with _wrapped(task, ddp):
        while len(losses) < total_steps:
            for batch_examples in _batches(examples, batch_size, shuffle):
                start, stop = shard_bounds(len(batch_examples), rank, world)
                shard = batch_examples[start:stop] or batch_examples[:1]  # empty shard: weight 0 below
                batch = {k: v.to(device) for k, v in task.collate(shard).items()}
                loss, count = task.loss(batch)
                count = count if stop > start else 0
                # (units on this rank, their summed loss) -> global units N and the global mean loss
                sums = torch.tensor([float(count), float(loss.detach()) * count], dtype=torch.float64, device=device)
                dist.all_reduce(sums)
                total = loss * (count * world / float(sums[0]))
                for term in hooks.loss_terms:
                    total = total + term()
                optimizer.zero_grad(set_to_none=True)
                total.backward()  # DDP averages the gradients over ranks here
                for hook in hooks.grad_hooks:
                    hook()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                losses.append(float(sums[1] / sums[0]))
                if len(losses) >= total_steps:
                    break
    task.module.eval()
    return LocalResult(num_examples=len(examples), steps=len(losses), train_loss=sum(losses) / len(losses))


def _read_params(worker: ClientWorker) -> np.ndarray:
    """The trainable vector, from CPU or GPU parameters."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in worker.view.params]).numpy()


def ddp_fit(worker: ClientWorker, ddp: torch.nn.Module, instr: FitInstruction, device: torch.device) -> ClientUpdate:
    """``ClientWorker.fit`` with the data-parallel loop; the update is meaningful on every rank, sent by rank 0."""
    started = time.perf_counter()
    cfg, hooks = worker.begin_fit(instr)
    result = ddp_local_train(
        worker.task,
        ddp,
        worker.examples(instr.client_id, train=True),
        cfg,
        seed=instr.seed,
        round_idx=instr.round,
        client_id=instr.client_id,
        hooks=hooks,
        device=device,
    )
    metrics = {"fit_seconds": time.perf_counter() - started, "nproc": float(dist.get_world_size())}
    return worker.reply(instr, result, _read_params(worker), metrics)


def _next_instruction(inbox: Any) -> FitInstruction | None:
    """The next instruction, or None to stop: asked to, or orphaned (the parent was SIGKILLed, e.g. a
    killed Ray actor, and can no longer tell us)."""
    parent = os.getppid()
    while True:
        try:
            return inbox.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _rank_main(rank: int, world: int, store: str, factory: WorkerFactory, device: str, inbox: Any, outbox: Any) -> None:
    """One rank: build the worker once, then serve fit instructions until told to stop (None)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks share this machine: stay on loopback
    dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
    try:
        worker = factory()
        worker.task.module.to(dev)
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        ddp = DistributedDataParallel(worker.task.module, device_ids=[rank] if device == "cuda" else None)
        outbox.put(("ready", rank, worker.view.spec.digest))
    except Exception as err:
        outbox.put(("error", rank, f"rank {rank} failed to start: {type(err).__name__}: {err}"))
        return
    try:
        while (instr := _next_instruction(inbox)) is not None:
            try:
                update = ddp_fit(worker, ddp, instr, dev)
            except (FedtuneError, ValueError) as err:  # every rank raises alike (same data, same instruction)
                if rank == 0:
                    outbox.put(("failed", rank, str(err)))
                continue
            if rank == 0:
                for transform in worker.update_transforms:  # clipping, noise, masking: once, on the reply
                    update = transform(update, instr)
                outbox.put(("ok", rank, update))
    except Exception as err:  # anything else ends this rank; say why instead of dying silently
        outbox.put(("error", rank, f"rank {rank} failed: {type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


class DDPFitter:
    """``nproc`` resident ranks training one participant data-parallel; ``fit`` returns rank 0's update."""

    def __init__(self, factory: WorkerFactory, nproc: int, *, device: str = "cpu", start_timeout_s: float = 300):
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        if device == "cuda" and torch.cuda.device_count() < nproc:
            raise FedtuneError(f"nproc={nproc} on GPU needs {nproc} GPUs, found {torch.cuda.device_count()}")
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads and any CUDA state
        self._dir = tempfile.mkdtemp(prefix="fedtune-ddp-")  # the rendezvous file: no TCP port to collide on
        self._inboxes = [ctx.Queue() for _ in range(nproc)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, nproc, os.path.join(self._dir, "store"), factory, device, self._inboxes[r], self._outbox),
                daemon=True,
            )
            for r in range(nproc)
        ]
        for p in self._procs:
            p.start()
        try:
            digests = {self._receive(start_timeout_s)[2] for _ in range(nproc)}
        except BaseException:
            self.close()
            raise
        self.spec_digest = digests.pop()

    @property
    def nproc(self) -> int:
        return len(self._procs)

    def fit(self, instr: FitInstruction, *, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> ClientUpdate:
        """Train on all ranks; raises the failure a worker would raise (ValueError) or FedtuneError."""
        for inbox in self._inboxes:
            inbox.put(instr)
        kind, _, payload = self._receive(timeout_s)
        if kind == "failed":
            raise ValueError(payload)
        return payload

    def _receive(self, timeout_s: float) -> tuple[str, int, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                msg = self._outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.close()
                    raise FedtuneError(f"data-parallel rank(s) {dead} exited") from None
                if time.monotonic() > deadline:
                    self.close()
                    raise FedtuneError(f"data-parallel ranks did not answer within {timeout_s:.0f} s") from None
                continue
            if msg[0] == "error":
                self.close()
                raise FedtuneError(msg[2])
            return msg

    def close(self) -> None:
        for inbox, proc in zip(self._inboxes, self._procs, strict=True):
            if proc.is_alive():
                inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._procs = [p for p in self._procs if p.is_alive()]
        self._inboxes = self._inboxes[: len(self._procs)]
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> DDPFitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_ddp_fit(factory: WorkerFactory, instr: FitInstruction, nproc: int, *, device: str = "cpu") -> ClientUpdate:
    """One fit on ``nproc`` fresh ranks (start-up included): for one-off use; keep a DDPFitter across rounds."""
    with DDPFitter(factory, nproc, device=device) as fitter:
        return fitter.fit(instr)


class DistributedClientWorker:
    """A ClientWorker whose fit runs data-parallel on ``nproc`` ranks; evaluation and data stay local.

    Drop-in for the transports (``records``, ``view``, ``fit``, ``evaluate``, ``current_params``).
    """

    def __init__(self, local: ClientWorker, factory: WorkerFactory, nproc: int, *, device: str = "cpu") -> None:
        self.local = local
        self.fitter = DDPFitter(factory, nproc, device=device)
        if self.fitter.spec_digest != local.view.spec.digest:
            self.fitter.close()
            raise FedtuneError("the data-parallel ranks built a different model than this process")
        self.records = local.records
        self.view = local.view
        # the transports have no hook to close a worker: stop the ranks when this object goes away
        weakref.finalize(self, self.fitter.close)

    def fit(self, instr: FitInstruction) -> ClientUpdate:
        return self.fitter.fit(instr)

    def evaluate(self, instr: EvalInstruction) -> ClientEval:
        return self.local.evaluate(instr)

    def current_params(self) -> np.ndarray:
        return self.local.current_params()

    def close(self) -> None:
        self.fitter.close()


def distributed_worker(factory: WorkerFactory, nproc: int) -> DistributedClientWorker:
    """Factory of factories, picklable with functools.partial: what a Ray actor calls for client_nproc > 1."""
    return DistributedClientWorker(factory(), factory, nproc)
