"""What each client is doing right now, and ``status.json``, which the dashboard reads.

The ``ClientBoard`` marks a client ``training`` or ``evaluating`` when the loop instructs it and ``idle`` (or
``straggling``, ``dead``, ``failed``, with the reason) when its reply or failure arrives: ``StatusSink`` marks
it from the loop's events (``fedtune.core.events``), as the progress bars are drawn. A ``ClientDirectory`` says
who is enrolled, connected and refused: everyone, always, in a simulation; the gRPC server's registry in a
deployment.

``StatusSink`` writes ``status.json`` atomically: on every round event, and from a small background thread
every ``every_s`` seconds (clients connect, train and reply between rounds), so a dashboard in another
process (``fedtune dashboard RUN_DIR``) sees a running federation live.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from fedtune.core.events import Answered, Dispatched, Event
from fedtune.core.state import ServerState
from fedtune.run.rundir import clean_json
from fedtune.run.sinks import BaseSink, RunEnd, RunInfo
from fedtune.transport.base import Transport

STATUS = "status.json"


@dataclass(frozen=True)
class Refusal:
    """A caller the server turned away, and why (bad certificate, revoked, not allowed, server full)."""

    who: str
    reason: str
    at: float  # unix time


class ClientDirectory(Protocol):
    def enrolled(self) -> list[str] | None:
        """Every client allowed to take part (None: anyone with a certificate from the federation's CA)."""
        ...

    def connected(self) -> list[str]: ...

    def refused(self) -> list[Refusal]: ...


class StaticDirectory:
    """A simulation: every client is enrolled and connected, and nobody is refused."""

    def __init__(self, transport: Transport) -> None:
        self.ids = list(transport.client_ids())  # a simulated population is fixed (read once, not from threads)

    def enrolled(self) -> list[str] | None:
        return self.ids

    def connected(self) -> list[str]:
        return self.ids

    def refused(self) -> list[Refusal]:
        return []


def failure_state(reason: str) -> str:
    """The dashboard's word for a failure reason (the reason itself is shown beside it)."""
    text = reason.lower()
    if "straggler" in text:
        return "straggling"
    if "presumed dead" in text or "no heartbeat" in text or "not connected" in text:
        return "dead"
    if text.startswith("rejected") or "refused" in text:
        return "refused"
    return "failed"


@dataclass
class Activity:
    state: str  # training | evaluating | idle | straggling | dead | refused | failed
    round: int
    since: float  # unix time the state began
    reason: str = ""


class ClientBoard:
    """Thread-safe: the coordinator thread writes, the status writer reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, Activity] = {}

    def mark(self, client_id: str, state: str, round_idx: int, reason: str = "") -> None:
        with self._lock:
            self._clients[client_id] = Activity(state, round_idx, time.time(), reason)

    def snapshot(self) -> dict[str, dict]:
        with self._lock:  # the fields are scalars: a shallow copy is asdict's result without its deep copy
            return {cid: dict(vars(a)) for cid, a in sorted(self._clients.items())}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # no indent: json's C encoder only runs without one (status.json lists every client, every second)
    tmp.write_text(json.dumps(clean_json(data), default=str))
    os.replace(tmp, path)


def _failed(record: dict) -> bool:
    return record.get("status") == "failed"  # a rejected round (server/loop.py): the model did not change


class StatusSink(BaseSink):
    """status.json: the run's phase, round x/N and ETA, the clients and what each is doing, refusals."""

    def __init__(self, board: ClientBoard, directory: ClientDirectory | None = None, *, every_s: float = 1.0) -> None:
        self.board, self.directory, self.every_s = board, directory, every_s
        self.path: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._doc: dict = {}
        self._round_seconds: list[float] = []
        self._round_started = time.time()

    def on_start(self, run: RunInfo) -> None:
        self.path = run.run_dir / STATUS
        now = time.time()
        self._doc = {
            "name": run.config.run.name,
            "run_dir": str(run.run_dir),
            "pid": os.getpid(),
            "started_at": now,
            "state": "running",
            "reason": "",
            "round": run.start_round,  # rounds run (a rejected one left the model as it was: rounds_failed)
            "rounds_failed": [r["round"] for r in run.history if r.get("kind") == "round" and _failed(r)],
            "total_rounds": run.total_rounds,
            "accuracy": run.accuracy,
            "trainable_params": run.trainable_params,
            "dp": run.config.privacy.dp is not None,
            "epsilon_budget": run.config.privacy.dp.epsilon_budget if run.config.privacy.dp else None,
            "delta": run.config.privacy.dp.delta if run.config.privacy.dp else None,
        }
        self._round_started = now
        self.write()
        self._thread = threading.Thread(target=self._loop, name="fedtune-status", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):  # also when nothing changed here: clients (dis)connect unseen
            try:
                self.write()
            except OSError as err:  # a full disk must not kill the writer; the round sinks will say so
                logging.getLogger("fedtune").debug("status.json not written: %s", err)

    def eta_s(self) -> float | None:
        """Mean of this process's last rounds times the rounds left, less the current round's time so far."""
        if not self._round_seconds or self._doc.get("state") != "running":
            return None
        recent = self._round_seconds[-5:]
        left = self._doc["total_rounds"] - self._doc["round"]
        return max(0.0, sum(recent) / len(recent) * left - (time.time() - self._round_started))

    def write(self) -> None:
        if self.path is None:
            return
        with self._lock:
            doc = {**self._doc, "updated_at": time.time(), "eta_s": self.eta_s(), "clients": self.board.snapshot()}
            if self.directory is not None:
                doc["enrolled"] = self.directory.enrolled()
                doc["connected"] = self.directory.connected()
                doc["refused"] = [asdict(r) for r in self.directory.refused()]
            write_json_atomic(self.path, doc)

    def on_event(self, event: Event) -> None:
        """What each client is doing: instructed (training, evaluating), then idle or why it failed."""
        if isinstance(event, Dispatched):
            doing = "training" if event.phase == "train" else "evaluating"
            for cid in event.client_ids:
                self.board.mark(cid, doing, event.round)
        elif isinstance(event, Answered) and event.failure is None:
            self.board.mark(event.client_id, "idle", event.round)
        elif isinstance(event, Answered):
            self.board.mark(event.client_id, failure_state(event.failure), event.round, event.failure)

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        now = time.time()
        with self._lock:  # the writer thread copies _doc under the same lock
            if state.round > self._doc["round"]:
                self._round_seconds.append(now - self._round_started)
            self._round_started = now
            self._doc["round"] = state.round
            if records and _failed(records[0]):
                self._doc["rounds_failed"].append(records[0]["round"])
        self.write()

    def on_stop(self, state: ServerState, reason: str) -> None:
        with self._lock:
            self._doc.update(state="stopped", reason=reason)
        self.write()

    def close(self, end: RunEnd) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        reason = end.reason or self._doc.get("reason", "")
        self._doc.update(state=end.outcome, reason=reason, ended_at=time.time())
        if end.state is not None:
            self._doc["round"] = end.state.round
        self.write()
