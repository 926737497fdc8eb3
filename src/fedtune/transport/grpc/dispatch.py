"""Asynchronous fit over gRPC (``fedtune.transport.base.Dispatch``): one task at a time, replies as they come.

A synchronous round queues its tasks and collects them until a common deadline (``GrpcServerTransport._collect``).
FedBuff instead keeps up to M clients training and hands each reply on as it arrives, so here every task has
its own deadline (``deployment.round_timeout_s`` from its dispatch) and all of them answer into one inbox. The
registry's rules are the same: a result must name an open task issued to its caller, and every task ends exactly
once, answered, failed (its client died, restarted or left) or expired, so a slot is never lost.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import replace

from fedtune.config.deployment import TIME_BUDGET_OPTION, DeploymentConfig
from fedtune.core.messages import ClientFailure, FitInstruction, Reply
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.grpc.registry import Registry, Task

log = logging.getLogger("fedtune.server")


class LiveFit:
    """The Dispatch half of GrpcServerTransport: open fit tasks, each with its own deadline, one inbox."""

    def __init__(self, registry: Registry, dep: DeploymentConfig) -> None:
        self.registry, self.dep = registry, dep
        self.inbox: queue.Queue = queue.Queue()
        self._open: dict[str, tuple[Task, float]] = {}  # task id -> (task, its monotonic deadline)

    def connected(self) -> list[str]:
        return self.registry.live()

    def dispatch(self, instruction: FitInstruction) -> None:
        if self.dep.partial_work:  # as in a synchronous round: the client stops in time and sends what it has
            budget = self.dep.partial_work_share * self.dep.round_timeout_s
            instruction = replace(instruction, options={**instruction.options, TIME_BUDGET_OPTION: budget})
        task_id = Task.new_id()
        payload = protocol.fit_payload(instruction, task_id)
        prepared = wire.prepare(payload.tensors)
        task = Task(instruction.client_id, pb.FIT, instruction.round, payload, prepared, self.inbox, task_id)
        self._open[task_id] = (task, time.monotonic() + self.dep.round_timeout_s)
        self.registry.assign(task)  # a client that is not connected fails the task at once, into the inbox

    def next_reply(self, timeout: float) -> Reply | ClientFailure | None:
        """The next reply, a failure (dead client, expired deadline), or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            expired = self._expire()
            if expired is not None:
                return expired
            left = min(deadline - time.monotonic(), self._next_deadline() - time.monotonic())
            try:
                task_id, reply = self.inbox.get(timeout=max(0.0, min(left, 0.25)))
            except queue.Empty:
                for cid in self.registry.reap():  # their open tasks fail into the inbox
                    log.warning("client %s presumed dead (missed heartbeats)", cid)
                if time.monotonic() >= deadline:
                    return None
                continue
            if self._open.pop(task_id, None) is not None:
                return reply

    def abandon(self) -> None:
        self.registry.expire([task for task, _ in self._open.values()])
        self._open.clear()

    def _next_deadline(self) -> float:
        return min((d for _, d in self._open.values()), default=float("inf"))

    def _expire(self) -> ClientFailure | None:
        """The first open task past its deadline, closed (its late result will be refused), as a failure."""
        now = time.monotonic()
        for task_id, (task, deadline) in list(self._open.items()):
            if deadline <= now and self.registry.expire([task]):
                del self._open[task_id]
                reason = f"straggler: no training reply within {self.dep.round_timeout_s:g}s (dispatch {task.round})"
                log.warning("client %s: %s", task.client_id, reason)
                return ClientFailure(task.client_id, task.round, reason)
        return None
