"""Ray simulation: a pool of actors, each with ONE resident model, serving any simulated client.

Each actor calls a *worker factory* once (for ``fedtune run``: ``prepare(config).worker``, i.e. the base
model, its adapter and every client's data) and then serves fit/evaluate requests for whichever client it is
handed, by writing that client's global vector into the resident model, exactly like the in-process worker.
Memory therefore grows with the number of actors, not with the number of simulated clients. Client state that
must outlive a round belongs in ``fedtune.core.state_store``, never in an actor.

Results equal the in-process backend's bit for bit, because

* a fit is a pure function of its instruction: every random stream is derived from (seed, round, client), the
  local optimiser is fresh every round, and the actor builds the same model from the same seed;
* replies are yielded in instruction order (``ordered=True``, the default), so the server folds them in the
  same order and the float sums round the same way;
* the torch thread count is the same. Ray pins an actor to ``cpus_per_worker`` threads; a multi-threaded
  in-process run may reduce in another order and differ in the last bits (about 1e-7 relative). Set
  ``run.threads`` (applied by ``prepare`` in every process) to compare runs exactly.

The global vector is put in Ray's object store once per round and shared by every request (zero-copy reads
in the actors), so sending it to 1,000 clients costs one copy, not 1,000. Strategy arrays (``extras``) are
shared the same way whenever requests carry the same arrays (the LoRA residuals sent with every fit and
evaluation); per-client arrays such as SCAFFOLD's c_i get one object each.

Step-level progress (``steps=``): each actor's worker reports its local steps into one Ray queue (at most a few
reports a second per actor, and always the last step), and the driver hands them to ``steps`` while it waits
for replies, so the progress bar shows every client in training with its steps and examples/s.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedtune.config.simulation import SimulationConfig
from fedtune.core.events import StepProgress
from fedtune.core.messages import (
    ClientEval,
    ClientFailure,
    ClientUpdate,
    EvalInstruction,
    FitInstruction,
    failure_of,
)
from fedtune.errors import ConfigError, FedtuneError
from fedtune.transport.base import SIMULATED
from fedtune.transport.inprocess import eval_with_bytes, with_bytes

# () -> an object with ``fit(FitInstruction) -> ClientUpdate``, ``evaluate(EvalInstruction) -> ClientEval``,
# ``close()`` and ``records`` (client id -> data); a ClientWorker. Must be picklable: it is shipped to every actor.
WorkerFactory = Callable[[], Any]

DEFAULT_TEMP_DIR = "/tmp/fedtune-ray"  # short on purpose: Ray's socket paths must stay under 107 bytes
_NO_PARAMS = np.empty(0, dtype=np.float32)  # placeholder: the real vector travels as a shared object ref
STEP_REPORT_EVERY_S = 0.25  # an actor's step reports, at most this often (plus every round's last step)
StepListener = Callable[[StepProgress], None]  # told each local step of a client (the run's EventRelay)


class StepForwarder:
    """A worker's ``on_step`` inside an actor: forwards step reports to the driver's queue, throttled."""

    def __init__(self, queue: Any, every_s: float = STEP_REPORT_EVERY_S) -> None:
        self.queue, self.every_s = queue, every_s
        self.last = -float("inf")

    def __call__(self, report: StepProgress) -> None:
        now = time.monotonic()
        if report.step < report.total_steps and now - self.last < self.every_s:
            return
        self.last = now
        with contextlib.suppress(Exception):  # a full queue drops a report: progress, never a reason to fail
            self.queue.put_nowait(report)


class _Worker:
    """The body of one actor: a resident worker built once, serving requests one at a time."""

    def __init__(self, factory: WorkerFactory, progress: Any = None) -> None:
        self.worker = factory()
        if progress is not None:  # the driver shows local steps: report them (a ClientWorker's on_step)
            self.worker.on_step = StepForwarder(progress)

    def describe(self) -> tuple[str, list[str]]:
        """(spec digest, client ids): checked against the driver's, so a mismatch fails at start-up."""
        return self.worker.view.spec.digest, list(self.worker.records)

    def close(self) -> None:
        self.worker.close()  # a data-parallel worker stops its ranks

    def fit(self, instr: FitInstruction, params: np.ndarray, extras: dict) -> ClientUpdate | ClientFailure:
        try:
            return self.worker.fit(replace(instr, params=params, extras=dict(extras)))
        except (FedtuneError, ValueError) as err:  # the same failures the in-process transport reports
            return failure_of(instr.client_id, instr.round, err)

    def evaluate(self, instr: EvalInstruction, params: np.ndarray, extras: dict) -> ClientEval | ClientFailure:
        try:
            return self.worker.evaluate(replace(instr, params=params, extras=dict(extras)))
        except (FedtuneError, ValueError) as err:
            return failure_of(instr.client_id, instr.round, err)


def _writable(update: ClientUpdate) -> ClientUpdate:
    """Arrays Ray hands back are read-only views of its object store; give the server ordinary arrays."""
    extras = {k: np.array(v) for k, v in update.extras.items()}
    return replace(update, delta=np.array(update.delta), extras=extras)


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError("simulation.backend 'ray' needs Ray: pip install 'fedtune[ray]' (ray==2.55.1)") from err
    return ray


def start_ray(cfg: SimulationConfig) -> bool:
    """Connect to ``cfg.ray_address`` or start a private local Ray; False when Ray was already up."""
    ray = _ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phone-home from a research run
    if cfg.ray_address is not None:
        ray.init(address=cfg.ray_address, log_to_driver=cfg.log_to_driver, include_dashboard=False)
        return True
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        log_to_driver=cfg.log_to_driver,
        _temp_dir=cfg.temp_dir or DEFAULT_TEMP_DIR,
        object_store_memory=None if cfg.object_store_mb is None else cfg.object_store_mb * 2**20,
    )
    return True


class RayTransport:
    """The Transport protocol over a pool of Ray actors (see the module docstring)."""

    capabilities = SIMULATED

    def __init__(
        self,
        factory: WorkerFactory,
        client_ids: Sequence[str],
        cfg: SimulationConfig,
        *,
        steps: StepListener | None = None,
    ) -> None:
        """``client_ids`` is the driver's population; every actor must build the same one. ``steps`` hears the
        actors' local steps while a round runs."""
        ray = _ray()
        self.cfg = cfg
        self._ids = list(client_ids)
        self._owns_ray = start_ray(cfg)
        self.steps, self._progress = steps, None
        self._actors: list[Any] = []
        try:
            if steps is not None:
                from ray.util.queue import Queue

                self._progress = Queue(maxsize=1000, actor_options={"num_cpus": 0})
            cpus = ray.cluster_resources().get("CPU", 1.0)
            count = cfg.num_workers or max(1, int(cpus // cfg.cpus_per_worker))
            if count * cfg.cpus_per_worker > cpus + 1e-9:
                # Ray would queue the actors that can never fit and wait for them forever: say so instead
                raise FedtuneError(
                    f"simulation.num_workers={count} x cpus_per_worker={cfg.cpus_per_worker:g} needs "
                    f"{count * cfg.cpus_per_worker:g} CPUs, but the Ray cluster has {cpus:g}: lower "
                    "simulation.num_workers or cpus_per_worker"
                )
            # max_restarts: an actor that dies (OOM, segfault) is rebuilt for the next request; the request it
            # was serving becomes a ClientFailure and the round goes on.
            actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker, max_restarts=2, max_task_retries=0)(_Worker)
            self._actors = [actor_cls.remote(factory, self._progress) for _ in range(count)]
            described = ray.get([a.describe.remote() for a in self._actors])
            if any(ids != self._ids for _, ids in described) or len({d for d, _ in described}) != 1:
                raise FedtuneError(
                    "the Ray workers built a different model or population than the driver "
                    f"({[len(ids) for _, ids in described]} clients vs {len(self._ids)}): "
                    "the worker factory must be deterministic"
                )
            self.spec_digest = described[0][0]
        except BaseException:
            self.close()
            raise

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    def client_ids(self) -> list[str]:
        return list(self._ids)

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]:
        for instr, reply in self._dispatch("fit", instructions):
            if isinstance(reply, ClientUpdate):
                reply = with_bytes(_writable(reply), instr)
            yield reply

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        for instr, reply in self._dispatch("evaluate", instructions):
            yield eval_with_bytes(reply, instr) if isinstance(reply, ClientEval) else reply

    def close(self) -> None:
        ray = _ray()
        with contextlib.suppress(Exception):  # best effort: a dead actor has nothing left to close
            ray.get([a.close.remote() for a in self._actors], timeout=30)
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._progress is not None:
            with contextlib.suppress(Exception):
                self._progress.shutdown()
            self._progress = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False

    def _dispatch(self, method: str, instructions: Sequence[Any]) -> Iterator[tuple[Any, Any]]:
        """Run ``method`` for every instruction on the pool; yield (instruction, reply).

        At most ``max_in_flight`` requests wait on each actor, and (when ordered) replies that finish early
        wait in ``done`` for their turn; both are bounded by the pool's window, so memory does not grow with
        the number of clients in a round.
        """
        ray = _ray()
        shared: dict[int, Any] = {}  # id(params) -> object ref: one copy of the global vector per round
        shared_extras: dict[tuple, Any] = {}  # the identities of an extras dict's arrays -> one object ref
        load = dict.fromkeys(range(len(self._actors)), 0)
        window = len(self._actors) * self.cfg.max_in_flight
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (instruction index, actor index)
        done: dict[int, Any] = {}
        next_in = next_out = 0
        while next_out < len(instructions):
            while next_in < len(instructions) and len(pending) + len(done) < window:
                actor = min(load, key=load.__getitem__)
                if load[actor] >= self.cfg.max_in_flight:
                    break
                instr = instructions[next_in]
                if id(instr.params) not in shared:
                    shared[id(instr.params)] = ray.put(instr.params)
                # the instructions (and so their arrays) live until the loop ends: ids are not reused meanwhile
                key = tuple(sorted((k, id(v)) for k, v in instr.extras.items()))
                if key not in shared_extras:
                    shared_extras[key] = ray.put(instr.extras) if instr.extras else {}
                call = getattr(self._actors[actor], method)
                bare = replace(instr, params=_NO_PARAMS, extras={})
                ref = call.remote(bare, shared[id(instr.params)], shared_extras[key])
                pending[ref] = (next_in, actor)
                load[actor] += 1
                next_in += 1
            ready = self._wait(list(pending))
            index, actor = pending.pop(ready[0])
            load[actor] -= 1
            reply = self._get(ready[0], instructions[index])
            if not self.cfg.ordered:
                next_out += 1
                yield instructions[index], reply
                continue
            done[index] = reply
            while next_out in done:
                yield instructions[next_out], done.pop(next_out)
                next_out += 1

    def _wait(self, refs: list[Any]) -> list[Any]:
        """The next finished request; meanwhile the actors' step reports go to ``steps``."""
        ray = _ray()
        if self._progress is None:
            return ray.wait(refs, num_returns=1)[0]
        while True:
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            self._relay_steps()
            if ready:
                return ready

    def _relay_steps(self) -> None:
        assert self._progress is not None and self.steps is not None
        with contextlib.suppress(Exception):  # an empty queue, or one that went away: nothing to show
            for report in self._progress.get_nowait_batch(self._progress.qsize()):
                self.steps(report)

    def _get(self, ref: Any, instr: Any) -> Any:
        ray = _ray()
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:  # the actor died serving this client: report, go on
            return ClientFailure(instr.client_id, instr.round, f"Ray worker died: {err}")
