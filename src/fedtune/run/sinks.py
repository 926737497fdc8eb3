"""Round sinks: everything the coordinator does with a finished round, one small protocol.

``serve`` runs the rounds and hands each event to a list of sinks, in order: the progress bars, the metrics
log (a crash before the checkpoint replays the round), then the checkpoint, the console table, the plot,
``status.json``, the trackers (TensorBoard, MLflow, W&B) and, at the end, ``report.html`` and
``summary.json``. A sink is anything with these five methods; ``Sinks`` fans the events out.

Events: ``on_start`` once the run directory is open (with the records already in it, for a resumed run);
``on_event`` while a round runs, for each client instructed, answering or training a step
(``fedtune.core.events``: the progress bars and the client board draw from them); ``on_round`` with the new
state and the round's metrics.jsonl lines (round 0 is the baseline evaluation); ``on_stop`` when a strategy
ends the run early (e.g. the privacy budget); ``close`` once, however the run ends (finished, stopped,
failed, interrupted).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from rich.console import Console

from fedtune.config.schema import Config
from fedtune.core.events import Event
from fedtune.core.state import ServerState, state_writer
from fedtune.run import rundir
from fedtune.run.table import RoundTable

PLOT_EVERY_S = 30.0  # metrics.png is redrawn at most this often while a run is going

Outcome = Literal["finished", "stopped", "failed", "interrupted"]
log = logging.getLogger("fedtune")


@dataclass(frozen=True)
class RunInfo:
    """What every sink may want to know about the run, given once at the start."""

    run_dir: Path
    config: Config
    accuracy: bool  # evaluation reports accuracy (classifiers) or perplexity
    start_round: int  # rounds already completed (non-zero when resumed)
    history: list[dict] = field(default_factory=list)  # metrics.jsonl records already in the run directory
    trainable_params: int = 0

    @property
    def total_rounds(self) -> int:
        return self.config.federation.rounds


@dataclass(frozen=True)
class RunEnd:
    """How the run ended: the last state (None if it failed before one existed) and why."""

    outcome: Outcome
    state: ServerState | None
    reason: str = ""


class RoundSink(Protocol):
    def on_start(self, run: RunInfo) -> None: ...

    def on_event(self, event: Event) -> None: ...

    def on_round(self, state: ServerState, records: list[dict]) -> None: ...

    def on_stop(self, state: ServerState, reason: str) -> None: ...

    def close(self, end: RunEnd) -> None: ...


class Sinks:
    """Fans events out to sinks in order. ``close`` reaches every sink even if one of them raises."""

    def __init__(self, sinks: Sequence[RoundSink]) -> None:
        self.sinks = list(sinks)
        self.last_state: ServerState | None = None  # the last state handed on (what a resume continues from)

    def on_start(self, run: RunInfo) -> None:
        for sink in self.sinks:
            sink.on_start(run)

    def on_event(self, event: Event) -> None:
        for sink in self.sinks:
            sink.on_event(event)

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        self.last_state = state
        for sink in self.sinks:
            sink.on_round(state, records)

    def on_stop(self, state: ServerState, reason: str) -> None:
        for sink in self.sinks:
            sink.on_stop(state, reason)

    def close(self, end: RunEnd) -> None:
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close(end)
            except Exception as err:  # the others still flush and close; the first error is raised after
                log.warning("closing %s failed: %s", type(sink).__name__, err)
                first = first or err
        if first is not None and end.outcome in ("finished", "stopped"):
            raise first


class BaseSink:
    """No-op defaults, so a sink writes only the events it cares about."""

    def on_start(self, run: RunInfo) -> None:
        pass

    def on_event(self, event: Event) -> None:
        pass

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        pass

    def on_stop(self, state: ServerState, reason: str) -> None:
        pass

    def close(self, end: RunEnd) -> None:
        pass


class MetricsSink(BaseSink):
    """metrics.jsonl: every round's records, and a ``stop`` record when a strategy ends the run."""

    def __init__(self, metrics: rundir.MetricsLog) -> None:
        self.log = metrics

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        self.log.append(records)

    def on_stop(self, state: ServerState, reason: str) -> None:
        self.log.append([{"kind": "stop", "round": state.round, "reason": reason}])


class CheckpointSink(BaseSink):
    """checkpoint.safetensors after every round (atomic, checksummed, the previous one kept); the baseline
    (round 0) has none. After a rejected round the saved model is the last accepted one (the loop hands on the
    old parameters with the round advanced), so no checkpoint ever holds a rejected aggregate.

    The file is written and fsynced by one background thread while the next round trains (three fsyncs cost
    1-20 ms on a busy disk, a large part of a short round). At most one write is in flight: the next round's
    checkpoint, and ``close``, wait for it and raise its error. The metrics sink before this one has already
    made the round's records durable, so a crash at any point leaves a checkpoint no newer than metrics.jsonl
    (a resume truncates the log to the checkpoint and replays the rest, as it always has)."""

    def __init__(self, path: Path, config_digest: str) -> None:
        self.path, self.digest = path, config_digest
        self._thread: threading.Thread | None = None  # the write in flight
        self._error: BaseException | None = None  # what stopped it

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        if state.round > 0:
            write = state_writer(state, self.path, config_digest=self.digest)  # reads the state's extras now
            self.wait()
            self._thread = threading.Thread(target=self._write, args=(write,), name="fedtune-checkpoint")
            self._thread.start()

    def _write(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # handed to the coordinator thread by wait()
            self._error = err

    def wait(self) -> None:
        """Block until the last checkpoint is on disk (raising the error that stopped it, if any). Interrupted
        (Ctrl-C), the write stays pending, so ``close`` still waits for it before the run reports its last
        checkpoint."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self, end: RunEnd) -> None:
        self.wait()


class ConsoleSink(BaseSink):
    """One table row per round, each failure and an early stop, on the console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.table: RoundTable | None = None

    def on_start(self, run: RunInfo) -> None:
        privacy_columns = ["agg_epsilon"] if run.config.privacy.dp is not None else []  # DP: epsilon every round
        self.table = RoundTable(self.console, accuracy=run.accuracy, extra_columns=privacy_columns)
        for rec in run.history:
            if rec.get("kind") == "round":
                self.table.add(rec)

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        for rec in records:
            if rec.get("kind") == "failure":
                self.console.print(
                    f"[yellow]round {rec['round']}: client {rec['client_id']} failed: {rec['reason']}[/yellow]"
                )
            elif rec.get("kind") == "recovered":
                self.console.print(
                    f"round {rec['round']}: client {rec['client_id']} had lost its client state and was asked "
                    "again with it"
                )
        if records[0].get("status") == "failed":
            self.console.print(f"[yellow]round {records[0]['round']} rejected: {records[0]['reason']}[/yellow]")
        assert self.table is not None
        self.table.add(records[0])

    def on_stop(self, state: ServerState, reason: str) -> None:
        self.console.print(f"[yellow]stopped after round {state.round}: {reason}[/yellow]")


class PlotSink(BaseSink):
    """metrics.png. Drawing costs ~0.3 s: redrawn at most every ``every_s`` seconds, after the last round and
    at the end."""

    def __init__(self, metrics: rundir.MetricsLog, out: Path, *, title: str, every_s: float = PLOT_EVERY_S) -> None:
        self.log, self.out, self.title, self.every_s = metrics, out, title, every_s
        self.last = time.monotonic()
        self.total = 0

    def on_start(self, run: RunInfo) -> None:
        self.last, self.total = time.monotonic(), run.total_rounds

    def _draw(self) -> None:
        from fedtune.run.plot import plot_rounds  # matplotlib only for runs that plot

        plot_rounds(self.log.rounds(), self.out, title=self.title)
        self.last = time.monotonic()

    def on_round(self, state: ServerState, records: list[dict]) -> None:
        if state.round >= self.total or time.monotonic() - self.last >= self.every_s:
            self._draw()

    def close(self, end: RunEnd) -> None:
        if end.outcome in ("finished", "stopped"):
            self._draw()


class SummarySink(BaseSink):
    """summary.json when the run finishes or is stopped: baseline and final round records."""

    def __init__(self, metrics: rundir.MetricsLog, path: Path) -> None:
        self.log, self.path = metrics, path

    def close(self, end: RunEnd) -> None:
        if end.outcome not in ("finished", "stopped") or end.state is None:
            return
        rounds = self.log.rounds()
        failed = [r["round"] for r in rounds if r.get("status") == "failed"]  # rejected: the model unchanged
        summary = {
            "rounds_completed": sum(1 for r in rounds if r["round"] > 0) - len(failed),
            "rounds_failed": failed,
            "baseline": next((r for r in rounds if r["round"] == 0), {}),
            "final": next((r for r in reversed(rounds) if r["round"] > 0), {}),
            "spec_digest": end.state.spec.digest,
        }
        self.path.write_text(json.dumps(summary, indent=1))
