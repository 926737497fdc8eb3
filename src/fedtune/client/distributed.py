"""Data-parallel local training inside one participant: torch DistributedDataParallel over N processes.

A participant (a deployed client, ``fedtune client --nproc N``, or one simulated client with
``simulation.client_nproc: N``) trains on N local processes: gloo on CPU, NCCL with one GPU per rank
(``process_group``: NCCL when CUDA shows N devices, else gloo). The process that talks to the server starts
the ranks once (``DDPFitter``) and relays each fit instruction to all of them; only rank 0 replies, and only
its update goes to the server.

Every rank builds the same worker (same model from the same seed, same data), draws the same minibatches as
``local_train`` (the same shuffle stream of (seed, round, client)) and trains on its contiguous shard of each
global batch: the loop is ``local_train``'s, with ``RankShard`` as its batch loss. DDP averages gradients
over ranks, and each rank's loss is scaled by ``n_rank * N / n_global`` (counted units: examples, or tokens
for a language model), so the averaged gradient is exactly the gradient of the global batch's mean loss,
which is what one process computes on the whole batch, also for an uneven last batch. A rank whose shard is
empty (a batch smaller than N) runs one example with weight 0 so it still joins the gradient all-reduce. Up
to float rounding, the result equals a single-process run.

Limits: dropout masks differ from a single process (each rank draws its own); per-example hooks such as
DP-SGD's per-sample clipping would see one rank's shard, so DP-SGD with ``nproc > 1`` is refused
(``fedtune.config.privacy.check_dpsgd_data_parallel``); ranks run on this machine only (several machines per
participant need torchrun, not this launcher). On GPU ranks only the model and batches live on the rank's
device, and the strategy hooks put their tensors on each parameter's device (FedProx anchors, SCAFFOLD's
correction, LoRA residuals; straggler snapshots are read back to the CPU). The NCCL path is not exercised by
the tests: they run on CPU, and no GPU machine was available to this project's sessions.

>>> # fitter = DDPFitter(functools.partial(worker_from_config, config), nproc=2)
>>> # update = fitter.fit(instruction); fitter.close()      # or: run_ddp_fit(factory, instruction, 2)
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fedtune.client.worker import ClientWorker
from fedtune.core.messages import ClientEval, ClientUpdate, EvalInstruction, FitInstruction
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


@dataclass(frozen=True)
class RankShard:
    """``local_train``'s batch loss on this rank's contiguous shard of each global batch.

    Each rank's loss is weighted by ``n_rank * N / n_global`` (counted units), so DDP's average over ranks is
    the gradient of the global batch's mean loss; an empty shard runs one example with weight 0 so the rank
    still joins the gradient all-reduce. The reported loss is the global batch's mean task loss."""

    rank: int
    world: int
    device: torch.device

    @property
    def rng_scope(self) -> tuple[object, ...]:
        return ("rank", self.rank)  # each rank draws its own dropout masks

    def __call__(self, task: Task, examples: list[Example]) -> tuple[torch.Tensor, float]:
        start, stop = shard_bounds(len(examples), self.rank, self.world)
        shard = examples[start:stop] or examples[:1]  # empty shard: weight 0 below
        batch = {k: v.to(self.device) for k, v in task.collate(shard).items()}
        loss, count = task.loss(batch)
        count = count if stop > start else 0
        # (units on this rank, their summed loss) -> global units N and the global mean loss
        sums = torch.tensor([float(count), float(loss.detach()) * count], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        return loss * (count * self.world / float(sums[0])), float(sums[1] / sums[0])


def _read_params(worker: ClientWorker) -> np.ndarray:
    """The trainable vector, from CPU or GPU parameters."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in worker.view.params]).numpy()


def ddp_fit(worker: ClientWorker, ddp: torch.nn.Module, instr: FitInstruction, device: torch.device) -> ClientUpdate:
    """``ClientWorker.fit`` with the data-parallel loop; the update is meaningful on every rank, sent by rank 0."""
    started = time.perf_counter()
    with worker.fitting(instr) as fit:  # closed on every rank, however the fit ends
        with _wrapped(worker.task, ddp):  # every rank calls this together: the loss all-reduces per step
            result = worker.train(fit, batch_loss=RankShard(dist.get_rank(), dist.get_world_size(), device))
        metrics = {"fit_seconds": time.perf_counter() - started, "nproc": float(dist.get_world_size())}
        update = worker.reply(instr, result, _read_params(worker), metrics)
        # only rank 0's reply is sent: its finishes and transforms (clipping, noise, masking) run there, once
        return worker.finish(fit, update) if dist.get_rank() == 0 else update


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


@dataclass(frozen=True)
class ProcessGroup:
    backend: str  # "gloo" | "nccl"
    device: str  # "cpu" | "cuda"

    def rank_device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank) if self.device == "cuda" else torch.device("cpu")

    def device_ids(self, local_rank: int) -> list[int] | None:
        """DistributedDataParallel's ``device_ids``: the rank's GPU, or None on CPU."""
        return [local_rank] if self.device == "cuda" else None


def process_group(device: str, nproc: int, *, cuda_devices: int) -> ProcessGroup:
    """The collective backend and each rank's device for ``nproc`` ranks on this machine.

    ``device``: ``"cpu"`` (gloo), ``"cuda"`` (NCCL, one GPU per rank: the GPU index is the local rank, since
    NCCL refuses two ranks on one device), or ``"auto"``: NCCL when CUDA shows at least ``nproc`` devices,
    else gloo on CPU.

    >>> process_group("auto", 2, cuda_devices=0)
    ProcessGroup(backend='gloo', device='cpu')
    >>> process_group("auto", 2, cuda_devices=4).rank_device(1)
    device(type='cuda', index=1)
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"data-parallel device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and cuda_devices < nproc:
        raise FedtuneError(f"nproc={nproc} on GPU needs {nproc} GPUs, found {cuda_devices}")
    if device == "cuda" or (device == "auto" and cuda_devices >= nproc):
        return ProcessGroup("nccl", "cuda")
    return ProcessGroup("gloo", "cpu")


def _rank_main(
    rank: int, world: int, store: str, factory: WorkerFactory, group: ProcessGroup, inbox: Any, outbox: Any
) -> None:
    """One rank: build the worker once, then serve fit instructions until told to stop (None)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # ranks share this machine: stay on loopback
    dev = group.rank_device(rank)  # one machine: the local rank is the global rank
    try:
        worker = factory()
        worker.task.module.to(dev)
        dist.init_process_group(
            group.backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        ddp = DistributedDataParallel(worker.task.module, device_ids=group.device_ids(rank))
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
            if rank == 0:  # clipping, noise, masking: once, on rank 0's reply (ddp_fit)
                outbox.put(("ok", rank, update))
    except Exception as err:  # anything else ends this rank; say why instead of dying silently
        outbox.put(("error", rank, f"rank {rank} failed: {type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


class DDPFitter:
    """``nproc`` resident ranks training one participant data-parallel; ``fit`` returns rank 0's update."""

    def __init__(self, factory: WorkerFactory, nproc: int, *, device: str = "auto", start_timeout_s: float = 300):
        if nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {nproc}")
        self.group = process_group(device, nproc, cuda_devices=torch.cuda.device_count())
        ctx = mp.get_context("spawn")  # fork would copy the parent's threads and any CUDA state
        self._dir = tempfile.mkdtemp(prefix="fedtune-ddp-")  # the rendezvous file: no TCP port to collide on
        self._inboxes = [ctx.Queue() for _ in range(nproc)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, nproc, os.path.join(self._dir, "store"), factory, self.group, self._inboxes[r], self._outbox),
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


def run_ddp_fit(factory: WorkerFactory, instr: FitInstruction, nproc: int, *, device: str = "auto") -> ClientUpdate:
    """One fit on ``nproc`` fresh ranks (start-up included): for one-off use; keep a DDPFitter across rounds."""
    with DDPFitter(factory, nproc, device=device) as fitter:
        return fitter.fit(instr)


class DistributedClientWorker:
    """A ClientWorker whose fit runs data-parallel on ``nproc`` ranks; evaluation and data stay local.

    Drop-in for the transports (``records``, ``view``, ``fit``, ``evaluate``, ``current_params``).
    """

    def __init__(self, local: ClientWorker, factory: WorkerFactory, nproc: int, *, device: str = "auto") -> None:
        self.local = local
        self.fitter = DDPFitter(factory, nproc, device=device)
        if self.fitter.spec_digest != local.view.spec.digest:
            self.fitter.close()
            raise FedtuneError("the data-parallel ranks built a different model than this process")
        self.records = local.records
        self.view = local.view
        self.examples = local.examples  # what the participant declares at Join is counted from it
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
