"""The server's book of sessions and outstanding tasks, behind one lock.

A *session* is one connected client process (a rejoin replaces it); a *task* is one instruction with a
random id (a 128-bit nonce). A result must name an open task issued to the caller: that one rule rejects
replays (the id is closed), duplicates (closed by the first answer), results for another client (the id
belongs to someone else) and results from before a server restart (the id is unknown).

Every task ends exactly once, as a reply or a ClientFailure put on its round's inbox: answered, rejected,
its client dead (missed heartbeats), restarted or gone, or its deadline passed.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fedtune.core.messages import ClientFailure
from fedtune.errors import UpdateRejected
from fedtune.transport.grpc.wire import Payload, Prepared

log = logging.getLogger("fedtune.server")


class SessionError(Exception):
    """The caller's session token is unknown (server restarted, or the client was presumed dead)."""


@dataclass(eq=False)
class Task:
    client_id: str
    kind: int  # pb.FIT, pb.EVALUATE or one of pb.SECAGG_*
    round: int
    payload: Payload
    prepared: Prepared
    inbox: queue.Queue  # the collecting fit()/evaluate() call reads (task_id, reply) from here
    task_id: str = field(default_factory=lambda: Task.new_id())
    session: str | None = None  # the session it was delivered to
    done: bool = False
    bytes_down: int = 0

    @staticmethod
    def new_id() -> str:
        """A 128-bit random nonce: unguessable, so a result cannot name a task it was not given."""
        return secrets.token_hex(16)


@dataclass(frozen=True)
class SecAggReply:
    """A client's answer to one SecAgg task: its encoded protocol message (the protocol decodes it)."""

    client_id: str
    round: int
    message: bytes = field(repr=False)


@dataclass(eq=False)
class Session:
    client_id: str
    token: str
    last_seen: float
    outbox: collections.deque = field(default_factory=collections.deque)
    told_shutdown: bool = False


SHUTDOWN = object()  # what ``take`` returns once the federation is over


class Registry:
    def __init__(self, *, dead_after_s: float, max_clients: int, clock: Any = time.monotonic) -> None:
        self.dead_after_s = dead_after_s
        self.max_clients = max_clients
        self.clock = clock
        self._cond = threading.Condition()
        self._sessions: dict[str, Session] = {}  # client id -> its current session
        self._tasks: dict[str, Task] = {}  # open tasks by id
        self._enrolled: set[str] = set()  # every client that has joined this server (live or not)
        self.closed = False
        self.shutdown_reason: dict[str, Any] = {}
        self._refused: collections.deque[tuple[str, str, float]] = collections.deque(maxlen=100)

    # ------------------------------------------------------------------------------------ sessions

    def join(self, client_id: str) -> tuple[Session, bool]:
        """A new session for ``client_id``; a previous one is ended (the client restarted)."""
        with self._cond:
            old = self._sessions.get(client_id)
            if old is None and len(self._sessions) >= self.max_clients:
                raise UpdateRejected(f"the server already has deployment.max_clients={self.max_clients} clients")
            session = Session(client_id, secrets.token_hex(16), self.clock())
            if old is not None:
                # undelivered work moves to the new session; work the old process had started is lost
                session.outbox.extend(t for t in old.outbox if not t.done)
                old.outbox.clear()
                self._end(old, "client restarted and rejoined before replying; its work for this round is lost")
            self._sessions[client_id] = session
            self._enrolled.add(client_id)
            self._cond.notify_all()
            return session, old is not None

    def touch(self, client_id: str, token: str) -> Session:
        """The caller's live session, marked as seen now; SessionError if it is not current."""
        with self._cond:
            session = self._sessions.get(client_id)
            if session is None or session.token != token:
                raise SessionError(f"no current session {token[:8]!r} for client {client_id!r}; join again")
            session.last_seen = self.clock()
            return session

    def leave(self, client_id: str, token: str, reason: str = "") -> None:
        with self._cond:
            session = self._sessions.get(client_id)
            if session is not None and session.token == token:
                self._end(session, "client left the federation" + (f": {reason}" if reason else ""))

    def _end(self, session: Session, reason: str) -> None:
        """Remove a session and fail its open tasks (lock held)."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        queued = {t.task_id for t in session.outbox}
        for task in list(self._tasks.values()):
            if task.client_id == session.client_id and (task.session == session.token or task.task_id in queued):
                self._finish(task, ClientFailure(task.client_id, task.round, reason))
        session.outbox.clear()
        self._cond.notify_all()

    def reap(self) -> list[str]:
        """End sessions silent for longer than ``dead_after_s``; returns their client ids."""
        with self._cond:
            now, dead = self.clock(), []
            for session in list(self._sessions.values()):
                silent = now - session.last_seen
                if silent > self.dead_after_s:
                    dead.append(session.client_id)
                    self._end(session, f"no heartbeat for {silent:.1f}s (presumed dead)")
            return dead

    def refuse(self, who: str, reason: str) -> None:
        """Remember a caller turned away (the last 100), for the dashboard: who, why, when (unix time)."""
        with self._cond:
            self._refused.append((who, reason, time.time()))

    def refusals(self) -> list[tuple[str, str, float]]:
        with self._cond:
            return list(self._refused)

    def live(self) -> list[str]:
        with self._cond:
            return sorted(self._sessions)

    def enrolled(self) -> list[str]:
        """Every client that has joined (sorted): the population rounds sample from. A client that is down
        when sampled fails that round, so who is connected at a given moment cannot steer the sample."""
        with self._cond:
            return sorted(self._enrolled)

    def wait_for(self, count: int, timeout: float) -> list[str]:
        """Block until at least ``count`` live clients (reaping the dead) or ``timeout``; the live ids."""
        deadline = self.clock() + timeout
        while True:
            self.reap()
            with self._cond:
                live = sorted(self._sessions)
                left = deadline - self.clock()
                if len(live) >= count or left <= 0:
                    return live
                self._cond.wait(timeout=min(left, 1.0))

    # ------------------------------------------------------------------------------------ tasks

    def assign(self, task: Task) -> None:
        """Queue ``task`` for its client, or fail it at once if that client is not connected."""
        with self._cond:
            session = self._sessions.get(task.client_id)
            self._tasks[task.task_id] = task
            if session is None:
                self._finish(task, ClientFailure(task.client_id, task.round, "client is not connected"))
                return
            session.outbox.append(task)
            self._cond.notify_all()

    def take(self, session: Session, timeout: float) -> Task | object | None:
        """The session's next task (marked delivered), SHUTDOWN, or None after ``timeout`` seconds."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                if self._sessions.get(session.client_id) is not session:
                    raise SessionError(f"session of client {session.client_id!r} has ended; join again")
                while session.outbox:
                    task = session.outbox.popleft()
                    if not task.done:
                        task.session = session.token
                        return task
                if self.closed:
                    session.told_shutdown = True
                    self._cond.notify_all()
                    return SHUTDOWN
                left = deadline - self.clock()
                if left <= 0:
                    return None
                self._cond.wait(timeout=left)

    def requeue(self, task: Task) -> None:
        """Put back a task whose delivery broke off (the client will pull it again)."""
        with self._cond:
            session = self._sessions.get(task.client_id)
            if not task.done and session is not None:
                task.session = None
                session.outbox.appendleft(task)
                self._cond.notify_all()

    def claim(self, task_id: str, client_id: str) -> Task:
        """The open task ``task_id`` if the caller may answer it (closing it); UpdateRejected saying why not."""
        with self._cond:
            task = self._open_task(task_id, client_id)
            del self._tasks[task_id]  # the first answer closes it: a second one is a duplicate
            return task

    def peek(self, task_id: str, client_id: str) -> Task:
        """Like ``claim`` but leaves the task open: what a result's header is checked against (its session,
        round and size) before the server reads or allocates the result's body."""
        with self._cond:
            return self._open_task(task_id, client_id)

    def _open_task(self, task_id: str, client_id: str) -> Task:
        """(lock held)"""
        task = self._tasks.get(task_id)
        if task is None:
            raise UpdateRejected(
                f"unknown or closed task id {task_id[:16]!r}: a replayed or duplicate result, one past its "
                "deadline, or one from before a server restart"
            )
        if task.client_id != client_id:
            raise UpdateRejected(
                f"task {task_id[:16]!r} was issued to another client; your certificate says {client_id!r}"
            )
        if task.session is None:
            raise UpdateRejected(f"task {task_id[:16]!r} has not been delivered yet")
        return task

    def only_open_task(self, client_id: str) -> str:
        """The id of the one delivered, unanswered task of ``client_id`` ("" if none or several)."""
        with self._cond:
            ids = [t.task_id for t in self._tasks.values() if t.client_id == client_id and t.session is not None]
            return ids[0] if len(ids) == 1 else ""

    def finish(self, task: Task, reply: Any) -> bool:
        """Hand ``reply`` to the task's round; False if the task had already ended (deadline passed)."""
        with self._cond:
            return self._finish(task, reply)

    def _finish(self, task: Task, reply: Any) -> bool:
        self._tasks.pop(task.task_id, None)
        if task.done:
            return False
        task.done = True
        task.inbox.put((task.task_id, reply))
        return True

    def expire(self, tasks: list[Task]) -> list[Task]:
        """Close tasks whose deadline passed; returns those that had not been answered."""
        with self._cond:
            expired = [t for t in tasks if not t.done]
            for task in expired:
                task.done = True
                self._tasks.pop(task.task_id, None)
            return expired

    # ------------------------------------------------------------------------------------ shutdown

    def close(self, reason: dict[str, Any]) -> None:
        with self._cond:
            self.closed = True
            self.shutdown_reason = reason
            self._cond.notify_all()

    def wait_told(self, timeout: float) -> None:
        """After ``close``: wait until every live client has heard SHUTDOWN (or ``timeout``)."""
        deadline = self.clock() + timeout
        with self._cond:
            while any(not s.told_shutdown for s in self._sessions.values()):
                left = deadline - self.clock()
                if left <= 0:
                    return
                self._cond.wait(timeout=left)
