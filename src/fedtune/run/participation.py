"""Drive a federation from the user's own training loop: ``for job in fedtune.participate(...)``.

The federation (the in-process simulation, or a gRPC participant talking to ``fedtune server``) runs on a
background thread with ``ExternalWorker``s; every fit becomes a ``Job`` the user's loop receives, trains
and sends back. Handing over is strictly alternating (the federation's thread waits while the user's loop
trains), so the model is never touched by both threads at once. If the loop stops early (``break``, an
exception), the federation is unwound: in the simulation the run directory keeps every finished round, and
``resume=`` continues it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedtune.client.external import Abandoned, Job
from fedtune.errors import FedtuneError

T = TypeVar("T")


class Participation(Generic[T]):
    """Iterate once to receive jobs; afterwards ``result`` holds what the federation returned (a
    ``SimulationResult`` in simulation, the participant's exit code over gRPC)."""

    def __init__(self, target: Callable[[], T], *, stop: Callable[[], None] | None = None) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.closed = threading.Event()  # set: the user's loop takes no more jobs
        self.result: T | None = None
        self._target, self._stop = target, stop
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fedtune-federation", daemon=True)
        self._iterated = False

    def _run(self) -> None:
        try:
            self.result = self._target()
        except Abandoned:
            pass
        except BaseException as err:  # handed to the user's thread
            self._error = err
        finally:
            self.jobs.put(None)

    def __iter__(self) -> Iterator[Job]:
        if self._iterated:
            raise RuntimeError("a participation is iterated once; call fedtune.participate again")
        self._iterated = True
        self._thread.start()
        finished, job = False, None
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    finished = True
                    break
                yield job
                if not job.sent:
                    raise FedtuneError(
                        f"the loop moved on without job.send(num_examples) for round {job.round} of client "
                        f"{job.client_id}: every job must be sent back"
                    )
        finally:
            if not finished:
                if job is not None and not job.sent:
                    job.abandon()  # its fit is waiting for it
                self._unwind()
        if self._error is not None:
            raise self._error

    def _unwind(self) -> None:
        """The user's loop stopped: release the federation's thread and wait for it."""
        self.closed.set()
        while True:  # a fit waiting on its job is released (and raises Abandoned)
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.abandon()
        if self._stop is not None:
            self._stop()
        self._thread.join(timeout=60.0)
        self._error = None  # what the unwinding raised is not the user's concern: their own error propagates
