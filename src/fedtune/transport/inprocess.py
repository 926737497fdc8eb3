"""In-process simulation: every simulated client runs on one resident worker, one after another."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from fedtune.client.worker import ClientWorker
from fedtune.core.messages import (
    ClientEval,
    ClientFailure,
    ClientUpdate,
    EvalInstruction,
    FitInstruction,
    failure_of,
)
from fedtune.errors import FedtuneError
from fedtune.transport.base import SIMULATED


class InProcessTransport:
    capabilities = SIMULATED

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker

    def client_ids(self) -> list[str]:
        return list(self.worker.records)

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]:
        for instr in instructions:
            try:
                update = self.worker.fit(instr)
            except (FedtuneError, ValueError) as err:
                yield failure_of(instr.client_id, instr.round, err)
                continue
            # What would cross a network: the global vector and the strategy's payloads down, the delta up.
            update = with_bytes(update, instr)
            yield update
            del update  # the server folds and drops it: hold no update while the next client trains

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        for instr in instructions:
            try:
                result = self.worker.evaluate(instr)
            except (FedtuneError, ValueError) as err:
                yield failure_of(instr.client_id, instr.round, err)
            else:
                yield eval_with_bytes(result, instr)

    def close(self) -> None:
        pass


def with_bytes(update: ClientUpdate, instr: FitInstruction) -> ClientUpdate:
    """``update`` with the bytes a network would carry: params and extras down, delta and extras up."""
    up = update.delta.nbytes + sum(v.nbytes for v in update.extras.values())
    return replace(update, bytes_down=_down(instr), bytes_up=up)


def eval_with_bytes(result: ClientEval, instr: EvalInstruction) -> ClientEval:
    """``result`` with the bytes a network would carry down: the params and the extras (a LoRA residual)."""
    return replace(result, bytes_down=_down(instr))


def _down(instr: FitInstruction | EvalInstruction) -> int:
    return instr.params.nbytes + sum(v.nbytes for v in instr.extras.values())
