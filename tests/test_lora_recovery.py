"""A client that lost its copy of the exact LoRA modes' residual (a wiped cache, another run's store) while the
server believes it holds version v: its failure is typed (Cause.STATE_LOST, from ClientStateLost) on every
transport, the strategy forgets the version it holds (a state value, kept by checkpoints), and the loop asks it
again in the same round with the dense residual, so the run computes exactly what it would have without the loss.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedtune.client.residual_copy import ResidualCopy
from fedtune.config import parse_config
from fedtune.core.keys import RESIDUAL_BASE, RESIDUAL_PREFIX
from fedtune.core.messages import (
    Cause,
    ClientEval,
    ClientFailure,
    ClientUpdate,
    EvalInstruction,
    EvalSums,
    failure_of,
)
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState, load_state, save_state
from fedtune.errors import ClientStateLost, UpdateRejected
from fedtune.run.session import simulate
from fedtune.server.loop import evaluate_models, run_round
from fedtune.server.strategies import FedExLora, FedOpt
from fedtune.server.strategies.lora_wire import HELD_PREFIX
from fedtune.transport.grpc import protocol, wire
from fedtune.transport.grpc.proto import fedtune_pb2 as pb
from fedtune.transport.ray_backend import _Worker

R, D = 2, 24
SPEC = ParamSpec(
    names=("l.q.lora_A.weight", "l.q.lora_B.weight", "head.bias"),
    shapes=((R, D), (D, R), (3,)),
    dtypes=("float32",) * 3,
)
_stores = itertools.count()


def _updates(state: ServerState, clients: list[str], seed: int) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(cid, state.round + 1, 3 + i, rng.normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC.digest)
        for i, cid in enumerate(clients)
    ]


def test_a_lost_copy_is_a_typed_failure_and_the_forgotten_version_brings_the_dense_residual(tmp_path):
    strategy = FedOpt(plugins=[FedExLora()])
    state = strategy.init_state(np.random.default_rng(2).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)
    ResidualCopy(f"memory:recover-{next(_stores)}").resolve("a", strategy.fit_payload(state, "a")[0], round=1)
    state, _ = strategy.aggregate(state, _updates(state, ["a", "b"], seed=1))
    arrays, _ = strategy.fit_payload(state, "a")
    assert RESIDUAL_BASE in arrays  # increments: the server believes "a" holds version 0
    wiped = ResidualCopy(f"memory:recover-{next(_stores)}")
    with pytest.raises(ClientStateLost, match="holds none") as lost:
        wiped.resolve("a", arrays, round=2)
    failure = failure_of("a", 2, lost.value)
    assert failure.cause is Cause.STATE_LOST and "holds none" in failure.reason
    assert failure_of("a", 2, UpdateRejected("bad spec")).cause is Cause.ERROR  # other errors stay errors

    forgot = strategy.client_state_lost(state, "a")
    assert HELD_PREFIX + "a" in state.arrays and HELD_PREFIX + "a" not in forgot.arrays  # a new value
    assert HELD_PREFIX + "b" in forgot.arrays
    save_state(forgot, tmp_path / "ckpt.safetensors", config_digest="x")  # a checkpoint keeps the loss
    forgot = load_state(tmp_path / "ckpt.safetensors", config_digest="x")
    arrays, _ = strategy.fit_payload(forgot, "a")
    assert RESIDUAL_BASE not in arrays  # the dense residual
    got = wiped.resolve("a", arrays, round=2)
    np.testing.assert_array_equal(got[RESIDUAL_PREFIX + "l.q"], state.arrays[RESIDUAL_PREFIX + "l.q"])
    assert strategy.client_state_lost(forgot, "a") is forgot  # nothing left to forget: the same state
    eval_arrays = strategy.eval_payload(forgot, client_id="a")  # its evaluation gets the dense residual too
    assert RESIDUAL_BASE not in eval_arrays and RESIDUAL_PREFIX + "l.q" in eval_arrays


def test_the_cause_crosses_the_grpc_wire():
    """The participant's failure result carries the cause in its header (Header.cause); the server's decode
    reads it back; an unknown value (a newer client) is an ordinary error."""
    for cause in Cause:
        out = protocol.failure_payload("lost", task_id="t", round_idx=3, session="s", cause=cause)
        sent = [chunk.SerializeToString() for chunk in wire.encode(out, chunk_bytes=1024)]  # the bytes that travel
        decoded = wire.decode(sent, wire.Limits(max_payload_bytes=1 << 20))
        failure = protocol.failure_from_result(decoded, client_id="c", round_idx=3)
        assert failure == ClientFailure("c", 3, "client reported: lost", cause)
    header = pb.Header(kind=pb.FAILURE, task_id="t", round=3, cause=7)  # proto3 keeps an unknown enum value
    failure = protocol.failure_from_result(wire.Payload(header, {"reason": "?"}), client_id="c", round_idx=3)
    assert failure.cause is Cause.ERROR


class _LostWorker:
    """A worker whose every client lost its residual copy (what ResidualCopy raises)."""

    def fit(self, instr):
        raise ClientStateLost(f"{instr.client_id} holds none")

    evaluate = fit


def test_ray_actors_type_the_failure_too():
    actor = _Worker(_LostWorker)  # the actor's body, run here (no Ray needed)
    instr = EvalInstruction("c", 1, np.zeros(3, np.float32), "d", 8, None)
    failure = actor.evaluate(instr, instr.params, {})
    assert failure == ClientFailure("c", 1, "c holds none", Cause.STATE_LOST)


# --------------------------------------------------------------------------------------------- a whole run


def _llama_config(tmp: Path, name: str) -> dict:
    corpus = tmp / "corpus"
    corpus.mkdir(exist_ok=True)
    lines = ["To be, or not to be, that is the question.", "All the world's a stage, and all the men merely players."]
    for c in range(3):
        (corpus / f"speaker_{c}.txt").write_text(
            "\n\n".join(" ".join(lines[(c + i) % 2] for _ in range(3)) for i in range(8))
        )
    return {
        "seed": 5,
        "model": {"name": "tiny-llama", "max_length": 32, "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}},
        "data": {"source": "text", "path": str(corpus)},
        "federation": {"rounds": 4, "clients_per_round": 2},  # of 3: a client is evaluated without fitting
        "client": {"local_steps": 2, "batch_size": 4, "lr": 0.05},
        "eval": {"batch_size": 8},
        "server": {"lora_aggregation": "fedex"},
        "simulation": {"client_state": f"disk:{tmp / name / 'client_state'}"},
        "run": {"out_dir": str(tmp / name / "runs"), "plot": False, "threads": 1},
    }


class _Wipe:
    """A sink that deletes every client's residual copy after the rounds named (a wiped cache)."""

    def __init__(self, store: Path, after: set[int]) -> None:
        self.store, self.after, self.wiped = store, after, 0

    def on_start(self, run) -> None: ...

    def on_event(self, event) -> None: ...

    def on_round(self, state, records) -> None:
        if state.round in self.after:
            folder = self.store / "lora-residual"
            self.wiped += sum(1 for _ in folder.iterdir())
            shutil.rmtree(folder)

    def on_stop(self, state, reason) -> None: ...

    def close(self, end) -> None: ...


def test_a_run_whose_copies_are_wiped_equals_the_run_without(tmp_path):
    """Every client's copy is deleted after rounds 1 and 2: each later fit and evaluation of a client whose
    copy is gone fails once with STATE_LOST and is asked again with the dense residual, no client fails, and
    the final model, its residual and every evaluation equal the run without the wipes bit for bit."""
    quiet = Console(quiet=True)
    plain = simulate(parse_config(_llama_config(tmp_path, "plain")), console=quiet, show_progress=False)
    wipe_cfg = _llama_config(tmp_path, "wiped")
    wipe = _Wipe(tmp_path / "wiped" / "client_state", after={1, 2})
    wiped = simulate(parse_config(wipe_cfg), console=quiet, show_progress=False, sinks=[wipe])
    assert wipe.wiped > 0

    np.testing.assert_array_equal(wiped.state.params, plain.state.params)
    residuals = [k for k in plain.state.arrays if k.startswith(RESIDUAL_PREFIX)]
    assert residuals
    for key in residuals:
        np.testing.assert_array_equal(wiped.state.arrays[key], plain.state.arrays[key], err_msg=key)
    assert [r["eval_loss"] for r in wiped.rounds] == [r["eval_loss"] for r in plain.rounds]

    records = [json.loads(line) for line in (wiped.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "failure"]
    assert all(r["clients_ok"] == 2 for r in records if r["kind"] == "round" and r["round"] > 0)
    recovered = [r for r in records if r["kind"] == "recovered"]
    assert recovered and all(r["cause"] == "state-lost" and "holds none" in r["reason"] for r in recovered)
    fits = {(r["round"], r["client_id"]) for r in records if r["kind"] == "client"}
    assert sorted(fits) == [  # seed 5's sampling, which the expectations below follow
        (1, "speaker_0"), (1, "speaker_1"), (2, "speaker_0"), (2, "speaker_1"),
        (3, "speaker_0"), (3, "speaker_2"), (4, "speaker_0"), (4, "speaker_1"),
    ]  # fmt: skip
    lost = {(r["round"], r["client_id"]) for r in recovered}
    # round 2: both fitted in round 1 and lost their copies; round 3: speaker_0 fitted in round 2, speaker_2
    # never did (dense anyway), and speaker_1, evaluated after round 3 without fitting, lost the copy of round 2
    assert lost & fits == {(2, "speaker_0"), (2, "speaker_1"), (3, "speaker_0")}  # fits asked again
    assert lost - fits == {(3, "speaker_1")}  # an evaluation asked again
    plain_records = [json.loads(line) for line in (plain.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in plain_records if r["kind"] in ("failure", "recovered")]
    rounds = {r["round"]: r for r in records if r["kind"] == "round"}
    plain_rounds = {r["round"]: r for r in plain_records if r["kind"] == "round"}
    for key, round_idx in (("bytes_down", 2), ("bytes_down", 3), ("eval_bytes_down", 3)):
        assert rounds[round_idx][key] > plain_rounds[round_idx][key], (key, round_idx)  # the dense residual
    assert rounds[2]["eval_bytes_down"] == plain_rounds[2]["eval_bytes_down"]  # nobody lost a copy there


# --------------------------------------------------------------------------------------------- the loop's retry


class _Claims:
    """A scripted transport: "liar" says it lost its state at every fit and evaluation, "honest" at its first fit
    only, "plain" never; every update is delta = (index + 1) everywhere. Records what each call was asked."""

    ids = ("liar", "honest", "plain")

    def __init__(self) -> None:
        self.fits: list[list[str]] = []
        self.evals: list[list[str]] = []

    def client_ids(self) -> list[str]:
        return list(self.ids)

    def fit(self, instructions):
        self.fits.append([i.client_id for i in instructions])
        for instr in reversed(instructions):  # answers in reverse: the loop must still fold in sampled order
            cid = instr.client_id
            if cid == "liar" or (cid == "honest" and len(self.fits) == 1):
                yield failure_of(cid, instr.round, ClientStateLost(f"{cid} holds none"))
                continue
            delta = np.full(SPEC.numel, self.ids.index(cid) + 1, np.float32)
            yield ClientUpdate(cid, instr.round, 10, delta, SPEC.digest)

    def evaluate(self, instructions):
        self.evals.append([i.client_id for i in instructions])
        for instr in instructions:
            if instr.client_id == "liar":
                yield failure_of(instr.client_id, instr.round, ClientStateLost("lost again"))
            else:
                yield ClientEval(instr.client_id, instr.round, EvalSums(loss_sum=1.0, count=1))

    def close(self) -> None:
        pass


def test_the_loop_asks_a_client_that_lost_its_state_once_a_round_and_folds_in_sampled_order():
    config = parse_config({"federation": {"rounds": 1, "clients_per_round": 3}, "server": {"weighting": "uniform"}})
    transport = _Claims()
    state = ServerState(0, np.zeros(SPEC.numel, np.float32), SPEC)
    new, report = run_round(config, FedOpt(), transport, state)
    sampled = transport.fits[0]
    assert sorted(sampled) == sorted(_Claims.ids)
    # asked again once, in sampled order; the liar's second claim is an ordinary failure, not a third ask
    assert transport.fits[1:] == [[c for c in sampled if c in ("liar", "honest")]]
    assert [(f.client_id, f.cause) for f in report.recovered] == [
        (c, Cause.STATE_LOST) for c in sampled if c in ("liar", "honest")
    ]
    assert [(f.client_id, f.cause) for f in report.failures] == [("liar", Cause.STATE_LOST)]
    folded = [c["client_id"] for c in report.clients]
    assert folded == [c for c in sampled if c in ("honest", "plain")]  # sampled order, whatever arrived first
    np.testing.assert_array_equal(new.params, np.full(SPEC.numel, (2 + 3) / 2, np.float32))  # their mean
    assert transport.evals == [["honest", "plain"]]  # a client that failed the round is not asked to evaluate

    evaluation = evaluate_models(config, FedOpt(), transport, new, ["liar", "plain"])
    assert transport.evals[1:] == [["liar", "plain"], ["liar"]]  # an evaluation is asked again once too
    assert [f.client_id for f in evaluation.recovered] == ["liar"] == [f.client_id for f in evaluation.failures]
    assert list(evaluation.per_client) == ["plain"] and evaluation.pooled.count == 1
