"""What the user sees while a run goes: progress bars per round (clients, ``round x/N``, ETA, and the local
steps of each client in training), drawn by ``ProgressSink`` from the events the round loop and the workers
send (``fedtune.core.events``); the transports are not wrapped. The table of rounds is ``run/table.py``.

Where step-level progress is shown:
- in-process simulation: a live row of the current client's local steps (steps done of total, examples/s),
  from the worker's ``on_step`` through the run's ``EventRelay``;
- Ray actors: the same rows, one per client in training, from the actors' step reports (``RayTransport``'s
  ``steps``, a Ray queue read while the driver waits for replies, into the same relay);
- Ray actors and gRPC participants train in other processes: the server's bar shows, as each reply arrives,
  that client's summary from the reply's metrics (steps, examples/s: ``fit_summary`` of its ``Answered``),
  and every client record in metrics.jsonl (hence in the trackers) holds ``steps`` and ``examples_per_s``;
- a gRPC participant (``fedtune client`` on a terminal, one process) shows its own live bar of local steps
  (``StepBar``) and prints one line per round with steps, examples/s and loss.
Not shown: a live step count of a gRPC participant on the server's side (the protocol carries no progress
during a fit; the reply's summary comes when it ends).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedtune.core.events import Answered, Collected, Dispatched, Event, StepProgress
from fedtune.run.sinks import BaseSink, RunEnd, RunInfo


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RoundClock:
    """Estimates the time left: the mean length of the rounds seen so far (a round runs from one fit to the
    next, evaluation included) times the rounds left; before a round has finished, from the share of the
    current round's clients already done."""

    def __init__(self, total_rounds: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_rounds
        self.clock = clock
        self.durations: list[float] = []
        self.round: int | None = None
        self.started = 0.0

    def start(self, round_idx: int) -> None:
        now = self.clock()
        if self.round is not None and round_idx == self.round + 1:
            self.durations.append(now - self.started)
        self.round, self.started = round_idx, now

    def eta(self, done_share: float = 0.0) -> float | None:
        """Seconds left in the run, or None when there is nothing to go on yet."""
        if self.total is None or self.round is None:
            return None
        elapsed = self.clock() - self.started
        if self.durations:
            per_round = sum(self.durations) / len(self.durations)
        elif done_share > 0:
            per_round = elapsed / done_share
        else:
            return None
        left = per_round * (self.total - self.round + 1) - elapsed
        return max(left, 0.0)

    def label(self, round_idx: int) -> str:
        return f"round {round_idx}/{self.total}" if self.total else f"round {round_idx}"


def fit_summary(event: Answered) -> str:
    """One client's finished local round, from the figures its reply carried (any transport): '' if none."""
    parts = [f"{event.steps} steps"] if event.steps is not None else []
    if event.examples_per_s:
        parts.append(f"{event.examples_per_s:.1f} examples/s")
    return f"{event.client_id}: {', '.join(parts)}" if parts else ""


def _rate(report: StepProgress) -> str:
    return f"{report.examples / report.seconds if report.seconds > 0 else 0.0:.1f} examples/s"


class PhaseBar:
    """The bars of one phase (a round's training, an evaluation): the clients answered of those dispatched
    with the ETA, and under it a row per client in training (Ray: several at once) with its local steps."""

    COLUMNS = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )

    def __init__(self, console: Console, label: str, total: int, clock: RoundClock) -> None:
        self.total, self.clock, self.done = total, clock, 0
        self.bar = Progress(*self.COLUMNS, console=console, transient=True)
        self.bar.start()
        self.main = self.bar.add_task(label, total=total, info=self._eta(0.0))
        self.rows: dict[str, TaskID] = {}  # a row per client in training
        self.finished: set[str] = set()  # rows at their last step: removed when the next client starts

    def _eta(self, done: float) -> str:
        eta = self.clock.eta(done / self.total if self.total else 0.0)
        return f"ETA {_duration(eta)}" if eta is not None else "ETA ..."

    def answered(self, event: Answered) -> None:
        self.done += 1
        last = fit_summary(event)  # Ray / gRPC: the client's steps and speed, from its reply
        self.bar.update(self.main, advance=1, info=self._eta(self.done) + (f"  last {last}" if last else ""))

    def step(self, report: StepProgress) -> None:
        if report.client_id not in self.rows:
            for cid in self.finished:
                self.bar.remove_task(self.rows.pop(cid))
            self.finished.clear()
            label = f"  client {report.client_id}"
            self.rows[report.client_id] = self.bar.add_task(label, total=report.total_steps, info="")
        if report.step >= report.total_steps:
            self.finished.add(report.client_id)
        self.bar.update(self.rows[report.client_id], completed=report.step, info=_rate(report))
        self.bar.update(self.main, info=self._eta(self.done + report.step / report.total_steps))

    def stop(self) -> None:
        self.bar.stop()


class ProgressSink(BaseSink):
    """The run's progress bars, a sink like the metrics log: a ``PhaseBar`` from each ``Dispatched`` to its
    ``Collected``, labelled ``round x/N train``, ``round x/N eval`` or ``baseline eval``, with the ETA of a
    ``RoundClock``. Events outside a phase (a step report after its client answered) are dropped."""

    def __init__(self, console: Console, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.now = console, clock
        self.clock = RoundClock(None, clock)
        self.phase: PhaseBar | None = None

    def on_start(self, run: RunInfo) -> None:
        self.clock = RoundClock(run.total_rounds, self.now)

    def on_event(self, event: Event) -> None:
        if isinstance(event, Dispatched):
            self._stop()
            if event.client_ids:
                self.phase = PhaseBar(self.console, self._label(event), len(event.client_ids), self.clock)
        elif self.phase is None:
            return
        elif isinstance(event, Answered):
            self.phase.answered(event)
        elif isinstance(event, StepProgress):
            self.phase.step(event)
        elif isinstance(event, Collected):
            self._stop()

    def _label(self, event: Dispatched) -> str:
        if event.phase == "train":
            self.clock.start(event.round)
            return f"{self.clock.label(event.round)} train"
        return "baseline eval" if event.round == 0 else f"{self.clock.label(event.round)} eval"

    def _stop(self) -> None:
        if self.phase is not None:
            self.phase.stop()
            self.phase = None

    def close(self, end: RunEnd) -> None:
        self._stop()  # a run that failed mid-phase leaves no live bar behind


class StepBar:
    """A live bar of one process's local steps (a gRPC participant on a terminal): ``worker.on_step = StepBar(c)``.
    A new bar for each (client, round); it goes away when the round's last step is done."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.key: tuple[str, int] | None = None

    def __call__(self, report: StepProgress) -> None:
        if (report.client_id, report.round) != self.key:
            self.close()
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.progress = Progress(*columns, console=self.console, transient=True)
            self.progress.start()
            label = f"round {report.round} local steps"
            self.task = self.progress.add_task(label, total=report.total_steps, info="")
            self.key = (report.client_id, report.round)
        assert self.progress is not None and self.task is not None
        self.progress.update(self.task, completed=report.step, info=_rate(report))
        if report.step >= report.total_steps:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress, self.task, self.key = None, None, None
