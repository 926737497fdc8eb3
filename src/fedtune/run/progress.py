"""What the user sees: progress bars per round (clients, ``round x/N``, ETA, and the current client's local
steps) and one table row per round (rich).

Where step-level progress is shown:
- in-process simulation: a live bar of the current client's local steps (steps done of total, examples/s),
  fed by the worker's ``on_step`` through ``StepRelay``;
- Ray actors: the same bars, one per client in training, from the actors' step reports (``RayTransport``'s
  ``steps``, a Ray queue read while the driver waits for replies);
- Ray actors and gRPC participants train in other processes: the server's bar shows, as each reply arrives,
  that client's summary from the reply's metrics (steps, examples/s: ``fit_summary``), and every client
  record in metrics.jsonl (hence in the trackers) holds ``steps`` and ``examples_per_s``;
- a gRPC participant (``fedtune client`` on a terminal, one process) shows its own live bar of local steps
  (``StepBar``) and prints one line per round with steps, examples/s and loss.
Not shown: a live step count of a gRPC participant on the server's side (the protocol carries no progress
during a fit; the reply's summary comes when it ends).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.client.train import StepCallback, StepProgress
from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.transport.base import Transport


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


class StepRelay:
    """The seam between a local training loop and a display: the worker calls it after every step
    (``ClientWorker.on_step``), and it forwards to whichever listener is attached, if any."""

    def __init__(self) -> None:
        self.listener: StepCallback | None = None

    def __call__(self, report: StepProgress) -> None:
        if self.listener is not None:
            self.listener(report)


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


def fit_summary(reply: object) -> str:
    """One client's finished local round, from the metrics its reply carries (any transport): '' if none."""
    if not isinstance(reply, ClientUpdate):
        return ""
    m = reply.metrics
    parts = [f"{int(m['steps'])} steps"] if "steps" in m else []
    if m.get("examples_per_s"):
        parts.append(f"{m['examples_per_s']:.1f} examples/s")
    return f"{reply.client_id}: {', '.join(parts)}" if parts else ""


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
        rate = report.examples / report.seconds if report.seconds > 0 else 0.0
        self.progress.update(self.task, completed=report.step, info=f"{rate:.1f} examples/s")
        if report.step >= report.total_steps:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress, self.task, self.key = None, None, None


class ProgressTransport:
    """Wraps any transport and shows progress as replies arrive (composition, not inheritance): a bar of
    clients per round with ``round x/N`` and an ETA, and, where the transport's worker reports local steps
    (the in-process simulation, through ``steps``), a bar of the current client's steps with examples/s.
    Networked transports report per client only."""

    def __init__(
        self,
        inner: Transport,
        console: Console,
        *,
        enabled: bool = True,
        total_rounds: int | None = None,
        steps: StepRelay | None = None,
    ) -> None:
        self.inner = inner
        self.console = console
        self.enabled = enabled
        self.clock = RoundClock(total_rounds)
        self.steps = steps

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def _eta_text(self, done: float, total: int) -> str:
        eta = self.clock.eta(done / total if total else 0.0)
        return f"ETA {_duration(eta)}" if eta is not None else "ETA ..."

    def _track(self, replies: Iterator, total: int, label: str) -> Iterator:
        if not self.enabled:
            yield from replies
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, console=self.console, transient=True) as bar:
            tid = bar.add_task(label, total=total, info=self._eta_text(0, total))
            done = [0]
            step_row: dict[str, TaskID] = {}  # a row per client in training (Ray: several at once)
            finished: set[str] = set()  # rows at their last step: removed when the next client starts

            def on_step(report: StepProgress) -> None:
                text = f"  client {report.client_id}"
                if report.client_id not in step_row:
                    for cid in finished:
                        bar.remove_task(step_row.pop(cid))
                    finished.clear()
                    step_row[report.client_id] = bar.add_task(text, total=report.total_steps, info="")
                if report.step >= report.total_steps:
                    finished.add(report.client_id)
                rate = report.examples / report.seconds if report.seconds > 0 else 0.0
                bar.update(step_row[report.client_id], completed=report.step, info=f"{rate:.1f} examples/s")
                bar.update(tid, info=self._eta_text(done[0] + report.step / report.total_steps, total))

            if self.steps is not None:
                self.steps.listener = on_step
            try:
                for reply in replies:
                    done[0] += 1
                    last = fit_summary(reply)  # Ray / gRPC: the client's steps and speed, from its reply
                    info = self._eta_text(done[0], total) + (f"  last {last}" if last else "")
                    bar.update(tid, advance=1, info=info)
                    yield reply
            finally:
                if self.steps is not None:
                    self.steps.listener = None

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]:
        if instructions:
            self.clock.start(instructions[0].round)
        label = f"{self.clock.label(instructions[0].round)} train" if instructions else "train"
        return self._track(self.inner.fit(instructions), len(instructions), label)

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        if not instructions:
            label = "eval"
        elif instructions[0].round == 0:
            label = "baseline eval"  # the initial model, before round 1
        else:
            label = f"{self.clock.label(instructions[0].round)} eval"
        return self._track(self.inner.evaluate(instructions), len(instructions), label)

    def close(self) -> None:
        self.inner.close()


ROUND_COLUMNS = ("round", "clients", "train loss", "held-out loss", "quality", "MB down", "MB up", "seconds")


class RoundTable:
    """Prints one row per round as it finishes, and the whole table at the end."""

    def __init__(self, console: Console, *, accuracy: bool, extra_columns: Sequence[str] = ()) -> None:
        self.console = console
        self.accuracy = accuracy
        self.extra = list(extra_columns)
        self.rows: list[list[str]] = []

    def _fmt(self, value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def add(self, rec: dict) -> None:
        quality = rec.get("eval_accuracy") if self.accuracy else rec.get("eval_perplexity")
        row = [
            str(rec["round"]),
            f"{rec.get('clients_ok', 0)}/{rec.get('clients_sampled', 0)}",
            self._fmt(rec.get("train_loss"), ".4f"),
            self._fmt(rec.get("eval_loss"), ".4f"),
            self._fmt(quality, ".4f" if self.accuracy else ".2f"),
            _mb(rec.get("bytes_down", 0)),
            _mb(rec.get("bytes_up", 0)),
            self._fmt(rec.get("seconds"), ".1f"),
        ] + [self._fmt(rec.get(k), ".3f") for k in self.extra]
        if not self.rows:
            self.console.print(self._line(self._headers("acc" if self.accuracy else "ppl")), style="bold")
        self.rows.append(row)
        self.console.print(self._line(row), soft_wrap=True)

    def _line(self, cells: Sequence[str]) -> str:
        # fixed-width columns so rows printed one at a time still line up as a table
        widths = [5, 7, 10, 13, 9, 8, 8, 8] + [11] * len(self.extra)
        return " ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    def _headers(self, quality_name: str) -> list[str]:
        return [c if c != "quality" else quality_name for c in ROUND_COLUMNS] + self.extra

    def render(self) -> Table:
        quality_name = "accuracy" if self.accuracy else "perplexity"
        table = Table(title="federated rounds")
        for header in self._headers(quality_name):
            table.add_column(header, justify="right")
        for row in self.rows:
            table.add_row(*row)
        return table
