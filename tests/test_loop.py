"""The round loop against a scripted transport: bad replies are rejected with a reason, the rest aggregate."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np

from fedtune.config import parse_config
from fedtune.core.messages import ClientEval, ClientFailure, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.server.loop import run_round, run_rounds
from fedtune.server.strategies import FedOpt
from fedtune.tasks.base import EvalSums

SPEC = ParamSpec(names=("w",), shapes=((4,),), dtypes=("float32",))


class Scripted:
    """Each sampled client replies with delta = index+1 everywhere, unless a fault is scripted for it."""

    def __init__(self, n: int, faults: dict[int, str] | None = None) -> None:
        self.ids = [f"c{i}" for i in range(n)]
        self.faults = faults or {}
        self.seen_rounds: list[int] = []

    def client_ids(self) -> list[str]:
        return list(self.ids)

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate | ClientFailure]:
        for instr in instructions:
            self.seen_rounds.append(instr.round)
            i = self.ids.index(instr.client_id)
            update = ClientUpdate(instr.client_id, instr.round, 10, np.full(4, i + 1, np.float32), SPEC.digest)
            fault = self.faults.get(i)
            if fault == "nan":
                update = replace(update, delta=np.array([1, np.nan, 1, 1], np.float32))
            elif fault == "shape":
                update = replace(update, delta=np.ones(5, np.float32))
            elif fault == "digest":
                update = replace(update, spec_digest="deadbeef")
            elif fault == "stale":
                update = replace(update, round=instr.round - 1)
            elif fault == "crash":
                yield ClientFailure(instr.client_id, instr.round, "connection lost")
                continue
            elif fault == "duplicate":
                yield update
            elif fault == "impostor":
                update = replace(update, client_id="not-sampled")
            yield update

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval | ClientFailure]:
        for instr in instructions:
            yield ClientEval(instr.client_id, instr.round, EvalSums(loss_sum=float(instr.params.sum()), count=1))

    def close(self) -> None:
        pass


def _config(**fed: object) -> object:
    return parse_config(
        {"federation": {"rounds": 2, "clients_per_round": 8, **fed}, "server": {"weighting": "uniform"}}
    )


def test_every_bad_reply_is_rejected_with_a_reason_and_the_round_continues() -> None:
    faults = {0: "nan", 1: "shape", 2: "digest", 3: "stale", 4: "crash", 5: "duplicate", 6: "impostor"}
    transport = Scripted(8, faults)
    state = ServerState(0, np.zeros(4, np.float32), SPEC)
    new, report = run_round(_config(), FedOpt(), transport, state)
    reasons = {f.client_id: f.reason for f in report.failures}
    assert "NaN" in reasons["c0"]
    assert "5 values" in reasons["c1"]
    assert "digest" in reasons["c2"]
    assert "round" in reasons["c3"]
    assert reasons["c4"] == "connection lost"
    assert "duplicate" in reasons["c5"]
    assert "not sampled" in reasons["not-sampled"]
    # accepted: c5 (first copy) and c7, uniform mean of deltas 6 and 8
    assert sorted(c["client_id"] for c in report.clients) == ["c5", "c7"]
    np.testing.assert_allclose(new.params, np.full(4, 7.0))


def test_run_rounds_advances_and_calls_back() -> None:
    transport = Scripted(3)
    seen = []
    final = run_rounds(
        _config(clients_per_round=2),
        FedOpt(),
        transport,
        ServerState(0, np.zeros(4, np.float32), SPEC),
        on_round=lambda s, r: seen.append((s.round, r.round, r.eval_pooled is not None)),
    )
    assert final.round == 2 and [s[:2] for s in seen] == [(1, 1), (2, 2)] and all(s[2] for s in seen)
    assert transport.seen_rounds == [1, 1, 2, 2]


def test_the_loop_tells_its_events_whom_it_instructed_and_who_answered() -> None:
    from fedtune.core.events import Answered, Collected, Dispatched

    heard: list = []
    run_rounds(
        _config(rounds=1, clients_per_round=2),
        FedOpt(),
        Scripted(3, faults={0: "crash", 1: "crash", 2: "crash"}),
        ServerState(0, np.zeros(4, np.float32), SPEC),
        events=heard.append,
    )
    (sampled,) = [e.client_ids for e in heard if isinstance(e, Dispatched) and e.phase == "train"]
    first, second = sampled
    assert heard[:4] == [
        Dispatched("train", 1, sampled),
        Answered("train", 1, first, failure="connection lost"),
        Answered("train", 1, second, failure="connection lost"),
        Collected("train", 1),
    ]  # every client failed: the round is rejected, and the model of round 1 (the old one) evaluated
    everyone = ("c0", "c1", "c2")
    assert heard[4:] == [
        Dispatched("eval", 1, tuple(c for c in everyone if c not in sampled)),  # not the failed ones
        *[Answered("eval", 1, c) for c in everyone if c not in sampled],
        Collected("eval", 1),
    ]
