"""The exact LoRA modes' residual on the wire: increments in factored form to clients that hold a copy, the
dense matrices to the rest; every client's copy equals the server's residual, across skipped rounds, late
joiners, a resume from a checkpoint, and modules whose increments are cheaper dense."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedtune.client.residual_copy import ResidualCopy
from fedtune.core.keys import INCREMENT_PREFIX, RESIDUAL_BASE, RESIDUAL_PREFIX, RESIDUAL_VERSION
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import load_state, save_state
from fedtune.core.state_store import participant_address
from fedtune.errors import UpdateRejected
from fedtune.server.strategies import FedExLora, FedOpt, FLoRA, SvdLora
from fedtune.server.strategies.lora_wire import HISTORY

R, D = 2, 24
SPEC = ParamSpec(  # q: square, increments factored while small; k: narrow, its increments are never smaller
    names=("l.q.lora_A.weight", "l.q.lora_B.weight", "l.k.lora_A.weight", "l.k.lora_B.weight", "head.bias"),
    shapes=((R, D), (D, R), (R, 2), (2, R), (3,)),
    dtypes=("float32",) * 5,
)
_stores = itertools.count()

# round -> the clients that reply: c5 joins late, c0 skips rounds 3-4 and c1 is away longer than the history
SCHEDULE = {1: "c0 c1 c2", 2: "c0 c2 c3", 3: "c2 c3", 4: "c1 c4", 5: "c0 c5", 6: "c0 c2 c5", 7: "c3 c4 c5"}
SCHEDULE |= {8 + i: "c2 c3" for i in range(HISTORY)} | {8 + HISTORY: "c0 c1 c2"}
POPULATION = [f"c{i}" for i in range(7)]  # c6 never fits: its evaluations get the dense residual


def updates(state, clients, seed):
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(cid, state.round + 1, 3 + i, rng.normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC.digest)
        for i, cid in enumerate(clients)
    ]


def nbytes(arrays):
    return sum(v.nbytes for v in arrays.values())


@pytest.mark.parametrize("plugin", [FedExLora(), SvdLora(), FLoRA(seed=3)], ids=["fedex", "svd", "flora"])
def test_every_clients_copy_is_the_servers_residual(plugin, tmp_path):
    strategy = FedOpt(plugins=[plugin])
    state = strategy.init_state(np.random.default_rng(0).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)
    copy = ResidualCopy(f"memory:wire-{next(_stores)}")
    factored = dense = evals_factored = 0
    for round_idx, clients in SCHEDULE.items():
        if round_idx == 5:  # resume: the history and what each client holds come back from the checkpoint
            save_state(state, tmp_path / "ckpt.safetensors", config_digest="x")
            state = load_state(tmp_path / "ckpt.safetensors", config_digest="x")
        for cid in clients.split():
            arrays, _ = strategy.fit_payload(state, cid)
            assert int(arrays[RESIDUAL_VERSION][0]) == state.round
            full = {RESIDUAL_PREFIX + m: state.arrays[RESIDUAL_PREFIX + m] for m in ("l.q", "l.k")}
            got = copy.resolve(cid, arrays, round=round_idx)
            assert set(got) == set(full)
            for key in full:  # the same float32 factors, added by the same rule: equal to the bit here
                np.testing.assert_array_equal(got[key], full[key], err_msg=f"{cid} round {round_idx} {key}")
            assert RESIDUAL_PREFIX + "l.k" in arrays  # the narrow module always goes dense
            if RESIDUAL_BASE in arrays:
                factored += 1
                assert RESIDUAL_PREFIX + "l.q" not in arrays
                assert (
                    nbytes({k: v for k, v in arrays.items() if k.startswith(INCREMENT_PREFIX)})
                    < full[RESIDUAL_PREFIX + "l.q"].nbytes
                )
            else:
                dense += 1
        state, _ = strategy.aggregate(state, updates(state, clients.split(), seed=round_idx))
        for cid in POPULATION:  # the evaluation after the round: every client, fitted or not
            arrays = strategy.eval_payload(state, client_id=cid)
            got = copy.resolve(cid, arrays, round=state.round + 1, keep=False)  # read, never saved
            for m in ("l.q", "l.k"):
                np.testing.assert_array_equal(got[RESIDUAL_PREFIX + m], state.arrays[RESIDUAL_PREFIX + m])
            evals_factored += RESIDUAL_BASE in arrays
    assert factored >= 10 and dense >= 7  # both paths ran (first contacts, the long absence: dense)
    assert evals_factored >= 20
    assert set(strategy.eval_payload(state)) == {RESIDUAL_PREFIX + "l.q", RESIDUAL_PREFIX + "l.k"}  # export's


def test_first_contact_and_a_long_absence_get_the_dense_residual():
    strategy = FedOpt(plugins=[FedExLora()])
    state = strategy.init_state(np.zeros(SPEC.numel, np.float32), SPEC)
    state, _ = strategy.aggregate(state, updates(state, ["a", "b"], seed=1))
    assert RESIDUAL_BASE not in strategy.fit_payload(state, "new")[0]
    assert RESIDUAL_BASE in strategy.fit_payload(state, "a")[0]
    for seed in range(HISTORY):
        state, _ = strategy.aggregate(state, updates(state, ["b", "c"], seed=10 + seed))
    arrays, _ = strategy.fit_payload(state, "a")
    assert RESIDUAL_BASE not in arrays and RESIDUAL_PREFIX + "l.q" in arrays


def test_a_round_without_replies_sends_the_dense_residual_once_more():
    strategy = FedOpt(plugins=[SvdLora()])
    state = strategy.init_state(np.random.default_rng(1).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)
    state, _ = strategy.aggregate(state, updates(state, ["a", "b"], seed=1))
    state, _ = strategy.aggregate(state, [])  # the round advances, no increment is recorded for it
    assert RESIDUAL_BASE not in strategy.fit_payload(state, "a")[0]


def test_a_client_that_lost_its_copy_is_refused_with_a_clear_error():
    strategy = FedOpt(plugins=[FedExLora()])
    state = strategy.init_state(np.random.default_rng(2).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)
    first = ResidualCopy(f"memory:wire-{next(_stores)}")
    first.resolve("a", strategy.fit_payload(state, "a")[0], round=1)
    state, _ = strategy.aggregate(state, updates(state, ["a", "b"], seed=1))
    arrays, _ = strategy.fit_payload(state, "a")
    with pytest.raises(UpdateRejected, match="holds none"):
        ResidualCopy(f"memory:wire-{next(_stores)}").resolve("a", arrays, round=2)  # a wiped cache
    first.resolve("a", arrays, round=2)


def test_malformed_increments_are_refused():
    copy = ResidualCopy(f"memory:wire-{next(_stores)}")
    version = {RESIDUAL_VERSION: np.array([0], np.int64), RESIDUAL_PREFIX + "m": np.zeros((3, 4), np.float32)}
    copy.resolve("a", version, round=1)
    bad = {RESIDUAL_VERSION: np.array([1], np.int64), RESIDUAL_BASE: np.array([0], np.int64)}
    with pytest.raises(UpdateRejected, match="does not fit"):
        copy.resolve(
            "a",
            bad | {INCREMENT_PREFIX + "1/m/B": np.zeros((3, 2)), INCREMENT_PREFIX + "1/m/A": np.zeros((2, 5))},
            round=2,
        )
    with pytest.raises(UpdateRejected, match="malformed"):
        copy.resolve("a", bad | {INCREMENT_PREFIX + "x/m/B": np.zeros((3, 2))}, round=2)
    with pytest.raises(UpdateRejected, match="without 'lora/base'"):
        copy.resolve(
            "a", {RESIDUAL_VERSION: np.array([1], np.int64), INCREMENT_PREFIX + "1/m/B": np.zeros((3, 2))}, round=2
        )
    with pytest.raises(UpdateRejected, match="one integer"):
        copy.resolve("a", {RESIDUAL_VERSION: np.array([0.5])}, round=2)


def test_a_client_whose_reply_was_not_folded_skips_the_increments_it_already_holds():
    """A client that received round 2's payload but whose update the server never folded (rejected, late)
    holds version 1 while the server's record says 0: round 3 sends increments 1..2 and it adds only 2."""
    strategy = FedOpt(plugins=[FedExLora()])
    state = strategy.init_state(np.random.default_rng(4).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)
    copy = ResidualCopy(f"memory:wire-{next(_stores)}")
    copy.resolve("a", strategy.fit_payload(state, "a")[0], round=1)
    state, _ = strategy.aggregate(state, updates(state, ["a", "b"], seed=1))  # a holds version 0
    copy.resolve("a", strategy.fit_payload(state, "a")[0], round=2)  # a now holds version 1 ...
    state, _ = strategy.aggregate(state, updates(state, ["b", "c"], seed=2))  # ... but its reply was not folded
    arrays, _ = strategy.fit_payload(state, "a")
    assert int(arrays[RESIDUAL_BASE][0]) == 0 and any(k.startswith(INCREMENT_PREFIX + "1/") for k in arrays)
    got = copy.resolve("a", arrays, round=3)
    np.testing.assert_array_equal(got[RESIDUAL_PREFIX + "l.q"], state.arrays[RESIDUAL_PREFIX + "l.q"])


def test_a_copy_on_disk_survives_a_restarted_participant(tmp_path):
    """A participant's copy in its own disk store (what ``fedtune client`` and ``fedtune.participate(server=...)``
    use) is there for a new process: the increments after a restart apply; in memory they would be refused."""
    strategy = FedOpt(plugins=[FedExLora()])
    state = strategy.init_state(np.random.default_rng(4).normal(0, 0.3, SPEC.numel).astype(np.float32), SPEC)
    address = participant_address(tmp_path, "federation")
    ResidualCopy(address).resolve("a", strategy.fit_payload(state, "a")[0], round=1)
    assert any(p.is_file() for p in tmp_path.rglob("*")), "the copy is on disk"
    state, _ = strategy.aggregate(state, updates(state, ["a", "b"], seed=4))
    arrays, _ = strategy.fit_payload(state, "a")
    assert RESIDUAL_BASE in arrays  # increments, not the dense residual
    restarted = ResidualCopy(address).resolve("a", arrays, round=2)  # a new process, the same disk
    expected = {k: v for k, v in state.arrays.items() if k.startswith(RESIDUAL_PREFIX)}
    assert sorted(k for k in restarted if k.startswith(RESIDUAL_PREFIX)) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(restarted[key], value)
