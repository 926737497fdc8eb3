"""The transport seam: the one small protocol that in-process, Ray and gRPC transports implement.

Replies are yielded as they complete, so the server can fold each update into the aggregate and drop it.
A client that fails yields a ClientFailure with a reason; the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, EvalInstruction, FitInstruction


class Transport(Protocol):
    def client_ids(self) -> list[str]:
        """The population the server may sample from, in a fixed order."""
        ...

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]: ...

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]: ...

    def close(self) -> None: ...
