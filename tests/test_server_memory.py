"""The server's round costs a fixed number of model-sized buffers, and the memory-saving paths (block-wise
optimiser step, in-place mean, block-wise finiteness check) give exactly what the whole-vector math gives."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedtune.aggregation.fedavg import WeightedMean
from fedtune.aggregation.server_opt import _BLOCK, make_server_optimizer
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec, all_finite
from fedtune.server.strategies import FedOpt

N = 3 * _BLOCK + 5  # several blocks and a ragged tail


def whole_vector(name: str, params, delta, slots, *, lr: float):
    """The float64 whole-vector transcription of each rule, rounded once: the oracle for the block-wise step."""
    x, d = params.astype(np.float64), delta.astype(np.float64)
    if name == "sgd":
        return (x + lr * d).astype(np.float32), {}
    if name == "momentum":
        v = 0.9 * slots["v"].astype(np.float64) + d
        return (x + lr * v).astype(np.float32), {"v": v.astype(np.float32)}
    m = 0.9 * slots["m"].astype(np.float64) + (1.0 - 0.9) * d
    v = 0.99 * slots["v"].astype(np.float64) + (1.0 - 0.99) * d * d
    return (x + lr * m / (np.sqrt(v) + 1e-3)).astype(np.float32), {"m": m.astype(np.float32), "v": v.astype(np.float32)}


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_blockwise_step_is_bit_identical_and_leaves_inputs_alone(name: str) -> None:
    rng = np.random.default_rng(3)
    opt = make_server_optimizer(name, lr=0.37)
    params = (rng.standard_normal(N) * 10.0 ** rng.integers(-6, 4, N)).astype(np.float32)
    slots = opt.init(N)
    for _ in range(3):
        delta = (rng.standard_normal(N) * 10.0 ** rng.integers(-8, 2, N)).astype(np.float32)
        kept = params.copy(), delta.copy(), {k: v.copy() for k, v in slots.items()}
        want_params, want_slots = whole_vector(name, params, delta, slots, lr=0.37)
        new_params, new_slots = opt.step(params, delta, slots)
        assert new_params.tobytes() == want_params.tobytes()
        assert {k: v.tobytes() for k, v in new_slots.items()} == {k: v.tobytes() for k, v in want_slots.items()}
        np.testing.assert_array_equal(params, kept[0])
        np.testing.assert_array_equal(delta, kept[1])
        for k, v in slots.items():
            np.testing.assert_array_equal(v, kept[2][k])
        params, slots = new_params, new_slots


def test_step_rejects_a_delta_of_another_length() -> None:
    opt = make_server_optimizer("sgd", lr=1.0)
    with pytest.raises(ValueError, match="delta has shape"):
        opt.step(np.zeros(N, np.float32), np.zeros(N + 1, np.float32), {})


def test_weighted_mean_hands_its_accumulator_over_once() -> None:
    a, b = np.arange(N, dtype=np.float32), np.ones(N, np.float32)
    mean = WeightedMean(N)
    mean.add(a, 1.0)
    mean.add(b, 3.0)
    acc = a * np.float32(1.0) + b * np.float32(3.0)
    assert mean.result().tobytes() == (acc / np.float32(4.0)).tobytes()
    with pytest.raises(ValueError, match="finished"):
        mean.result()
    with pytest.raises(ValueError, match="finished"):
        mean.add(b, 1.0)


@pytest.mark.parametrize("bad", [None, 0, _BLOCK - 1, _BLOCK, N - 1])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_all_finite_matches_isfinite_across_blocks(bad: int | None, value: float) -> None:
    flat = np.ones(N, np.float32)
    if bad is not None:
        flat[bad] = value
    assert all_finite(flat) == bool(np.isfinite(flat).all())
    assert all_finite(np.zeros(0, np.float32))


@pytest.mark.parametrize(("name", "buffers"), [("sgd", 2), ("adam", 4)])
def test_round_allocates_a_fixed_number_of_buffers(name: str, buffers: int) -> None:
    """Accumulator + one update in flight, then accumulator + the new vector (and moments): see
    docs/BENCHMARKS.md. tracemalloc counts NumPy's data buffers exactly, so this does not depend on timing."""
    numel = 1 << 22  # 16 MiB per buffer
    spec = ParamSpec(names=("w",), shapes=((numel,),), dtypes=("float32",))
    strategy = FedOpt(optimizer=make_server_optimizer(name, lr=0.01))
    state = strategy.init_state(np.full(numel, 0.5, np.float32), spec)

    def replies():
        for j in range(6):  # produced on demand and kept by no local, like a transport's reply
            yield ClientUpdate(f"c{j}", 1, 10 + j, np.full(numel, 1e-3 * (j + 1), np.float32), spec.digest)

    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        new_state, metrics = strategy.aggregate(state, replies())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert metrics["aggregated"] == 6 and new_state.params is not state.params
    scratch = 16 * _BLOCK * 8  # the step's float64 temporaries: a handful of blocks, whatever the model size
    assert peak - start < buffers * numel * 4 + scratch


@pytest.mark.parametrize(("arrival", "held"), [("sampled", 0), ("reversed", 5)])
def test_the_order_fixed_fold_holds_only_updates_that_overtake(arrival: str, held: int) -> None:
    """The loop folds replies in sampled order (bit-identical whatever the network does): replies that arrive
    in that order cost nothing extra; each reply that overtakes an earlier-sampled client is held until that
    client answers or fails (worst case: all but one of the round's updates, when they arrive reversed)."""
    from fedtune.config import parse_config
    from fedtune.server.loop import run_round

    numel, k = 1 << 22, 6
    spec = ParamSpec(names=("w",), shapes=((numel,),), dtypes=("float32",))
    config = parse_config({"federation": {"rounds": 1, "clients_per_round": k}, "eval": {"every": 5}})
    strategy = FedOpt()
    state = strategy.init_state(np.full(numel, 0.5, np.float32), spec)

    class Transport:
        def client_ids(self):
            return [f"c{j}" for j in range(k)]

        def fit(self, instructions):
            order = list(instructions) if arrival == "sampled" else list(reversed(instructions))
            for instr in order:
                j = int(instr.client_id[1:])
                yield ClientUpdate(instr.client_id, 1, 10, np.full(numel, 1e-3 * (j + 1), np.float32), spec.digest)

        def evaluate(self, instructions):
            return iter(())

    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        _, report = run_round(config, strategy, Transport(), state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.aggregate["aggregated"] == k and report.rejected is None
    buffer = numel * 4
    # sgd: accumulator + one update in flight, then accumulator + the new vector (see above), + the held ones
    assert (held + 1) * buffer < peak - start < (held + 2) * buffer + 16 * _BLOCK * 8 + (1 << 20)
