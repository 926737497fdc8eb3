"""What happens to clients while a round runs, as typed events for the run's sinks (progress bars, the client
board of status.json).

The loop says whom it instructed (``Dispatched``), who answered or failed (``Answered``, as each reply comes
off the transport, before it is checked) and when a phase is over (``Collected``); a worker, in this process
or in a Ray actor, says how far its local training has got (``StepProgress``). Events only describe: nothing
in a round depends on who listens, and a listener must not raise.

    Dispatched(train, r, ids)  Answered(train, r, id) ... [StepProgress ...]  Collected(train, r)
    Dispatched(eval, r, ids)   Answered(eval, r, id) ...                       Collected(eval, r)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, HeldUpdate

Phase = Literal["train", "eval"]
R = TypeVar("R", bound=ClientUpdate | HeldUpdate | ClientEval | ClientFailure)  # a reply, or a failure


@dataclass(frozen=True)
class Dispatched:
    """The loop sent ``client_ids`` their instructions: a round's training, or an evaluation of the model of
    ``round`` (round 0: the baseline). In asynchronous mode a round is a buffered step."""

    phase: Phase
    round: int
    client_ids: tuple[str, ...]


@dataclass(frozen=True)
class Answered:
    """One client's reply, or its failure, reached the loop. A fit reply's own figures ride along (a client in
    another process reports its steps only here)."""

    phase: Phase
    round: int
    client_id: str
    failure: str | None = None  # why the client failed; None: it replied
    steps: int | None = None  # local optimizer steps its reply reports
    examples_per_s: float | None = None  # its local training throughput


@dataclass(frozen=True)
class Collected:
    """The phase is over: every dispatched client has answered, failed, or been given up by the transport."""

    phase: Phase
    round: int


@dataclass(frozen=True)
class StepProgress:
    """One local optimizer step done (client/train.py ``local_train``)."""

    client_id: str
    round: int
    step: int  # optimizer steps done so far in this round (1-based)
    total_steps: int
    examples: int  # training examples consumed so far
    seconds: float  # since local training started


Event = Dispatched | Answered | Collected | StepProgress
EventListener = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The listener of a loop nobody watches."""


def answered(phase: Phase, round_idx: int, reply: ClientUpdate | HeldUpdate | ClientEval | ClientFailure) -> Answered:
    if isinstance(reply, ClientFailure):
        return Answered(phase, round_idx, reply.client_id, failure=reply.reason)
    if isinstance(reply, ClientEval):
        return Answered(phase, round_idx, reply.client_id)
    steps, rate = _finite(reply.metrics.get("steps")), _finite(reply.metrics.get("examples_per_s"))
    return Answered(phase, round_idx, reply.client_id, steps=None if steps is None else int(steps), examples_per_s=rate)


def _finite(value: float | None) -> float | None:
    """A figure a client reported, or None: a remote client's metrics are any JSON numbers (NaN, Infinity)."""
    return float(value) if value is not None and math.isfinite(value) else None


def observed(
    events: EventListener, phase: Phase, round_idx: int, client_ids: Sequence[str], replies: Iterable[R]
) -> Iterator[R]:
    """``replies`` unchanged, told to ``events``: ``Dispatched`` when the first is asked for, ``Answered`` for
    each as it arrives, ``Collected`` when the transport has no more."""
    events(Dispatched(phase, round_idx, tuple(client_ids)))
    for reply in replies:
        events(answered(phase, round_idx, reply))
        yield reply
        del reply  # not alive while the transport produces the next one
    events(Collected(phase, round_idx))


class EventRelay:
    """The seam between what is built before a run's sinks and the sinks: a worker's ``on_step`` or a Ray
    transport's ``steps`` is told every local step, and it forwards to whichever listener is attached (the
    run's sinks while it runs; nobody before or after)."""

    def __init__(self) -> None:
        self.listener: EventListener | None = None

    def __call__(self, event: Event) -> None:
        if self.listener is not None:
            self.listener(event)
