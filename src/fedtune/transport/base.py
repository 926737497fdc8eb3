"""The transport seam: the one small protocol that in-process, Ray and gRPC transports implement.

Replies are yielded as they complete, so the server can fold each update into the aggregate and drop it.
A client that fails yields a ClientFailure with a reason; the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedtune.core.messages import ClientEval, ClientFailure, EvalInstruction, FitInstruction, Reply


@dataclass(frozen=True)
class Capabilities:
    """What a transport can offer beyond fit and evaluate, declared (never guessed from its class name).

    ``simulated``: every client runs under this process's control and its update reaches this process, so
    secure aggregation can only be simulated here, over those updates (in-process, Ray). ``secure_sum``: the
    transport carries SecAgg's message rounds (``secagg_exchange``, the SecAggNetwork seam of
    ``fedtune.privacy.secagg.driver``) and its clients keep their updates, so the server sees only the sum.
    ``asynchronous``: it implements ``Dispatch`` (real clients train at their own pace; the simulated ones
    follow a simulated clock instead, ``fedtune.server.clock``).
    """

    simulated: bool = False
    secure_sum: bool = False
    # the transport also implements ``Dispatch``: one fit at a time to whoever is free, replies as they come
    # (FedBuff over real clients, ``fedtune.server.async_live``)
    asynchronous: bool = False


SIMULATED = Capabilities(simulated=True)


class Transport(Protocol):
    capabilities: Capabilities

    def client_ids(self) -> list[str]:
        """The population the server may sample from, in a fixed order."""
        ...

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[Reply | ClientFailure]:
        """Replies as they complete: a ClientUpdate, a HeldUpdate (SecAgg over the network: the client keeps
        its update), or a ClientFailure with the reason."""
        ...

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]: ...

    def close(self) -> None: ...


class Dispatch(Protocol):
    """Asynchronous fit over real clients (``Capabilities.asynchronous``): instructions go out one at a time, to
    clients that are connected and free, and replies come back as they arrive, whichever instruction they answer.
    Every dispatched instruction ends exactly once, as a reply or a ClientFailure (the client died, left, or
    passed the deadline)."""

    def connected(self) -> list[str]:
        """The clients connected now (sorted)."""
        ...

    def dispatch(self, instruction: FitInstruction) -> None:
        """Send one fit; its reply (or failure) comes from ``next_reply``."""
        ...

    def next_reply(self, timeout: float) -> Reply | ClientFailure | None:
        """The next reply to a dispatched fit, or None if none came within ``timeout`` seconds."""
        ...

    def abandon(self) -> None:
        """Close every fit still open (the run ended or stopped): their replies are refused."""
        ...
