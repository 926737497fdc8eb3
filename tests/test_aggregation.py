"""FedAvg aggregation against numpy.average, with clients that differ in data and weight."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation.fedavg import WeightedMean, client_weights, fold_weighted_mean
from fedtune.aggregation.server_opt import ServerSGD
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.server.strategies import FedOpt


def _deltas(rng: np.random.Generator, k: int, n: int) -> list[np.ndarray]:
    # every client differs, so weighted and unweighted means differ too
    return [rng.normal(loc=i, scale=1.0 + i, size=n).astype(np.float32) for i in range(k)]


def test_weighted_mean_matches_numpy_average() -> None:
    rng = np.random.default_rng(0)
    deltas = _deltas(rng, 5, 1000)
    weights = [3.0, 10.0, 1.0, 7.0, 50.0]
    got = fold_weighted_mean(zip(deltas, weights, strict=True), 1000)
    want = np.average(np.stack(deltas), axis=0, weights=weights)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32


def test_weighted_and_uniform_are_distinguishable() -> None:
    rng = np.random.default_rng(1)
    deltas = _deltas(rng, 3, 50)
    counts = [1, 10, 100]
    weighted = fold_weighted_mean(zip(deltas, client_weights(counts, weighting="examples"), strict=True), 50)
    uniform = fold_weighted_mean(zip(deltas, client_weights(counts, weighting="uniform"), strict=True), 50)
    np.testing.assert_allclose(uniform, np.mean(np.stack(deltas), axis=0), rtol=1e-6, atol=1e-6)
    assert np.abs(weighted - uniform).max() > 0.5


def test_fold_never_mutates_inputs() -> None:
    rng = np.random.default_rng(2)
    deltas = _deltas(rng, 4, 64)
    copies = [d.copy() for d in deltas]
    fold_weighted_mean(zip(deltas, [1.0, 2.0, 3.0, 4.0], strict=True), 64)
    for d, c in zip(deltas, copies, strict=True):
        np.testing.assert_array_equal(d, c)


def test_fold_rejects_bad_input() -> None:
    m = WeightedMean(4)
    with pytest.raises(ValueError, match="shape"):
        m.add(np.zeros(5, np.float32), 1.0)
    with pytest.raises(ValueError, match="positive"):
        m.add(np.zeros(4, np.float32), 0.0)
    with pytest.raises(ValueError, match="no updates"):
        m.result()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=0, max_value=2**31),
)
def test_fold_matches_numpy_property(counts: list[int], n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(size=n).astype(np.float32) * 10 for _ in counts]
    got = fold_weighted_mean(zip(deltas, [float(c) for c in counts], strict=True), n)
    want = np.average(np.stack(deltas).astype(np.float64), axis=0, weights=counts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _state(params: np.ndarray) -> ServerState:
    spec = ParamSpec(names=("w",), shapes=((params.size,),), dtypes=("float32",))
    return ServerState(round=0, params=params, spec=spec)


def _update(cid: str, delta: np.ndarray, n: int) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round=1, num_examples=n, delta=delta, spec_digest="x")


@pytest.mark.parametrize("eta", [1.0, 0.5, 2.0])
def test_fedavg_server_learning_rate(eta: float) -> None:
    """global' = global + eta * sum_k (n_k / n) delta_k."""
    rng = np.random.default_rng(3)
    params = rng.normal(size=20).astype(np.float32)
    deltas = _deltas(rng, 3, 20)
    counts = [5, 1, 20]
    state = _state(params.copy())
    new, metrics = FedOpt(optimizer=ServerSGD(lr=eta)).aggregate(
        state, (_update(f"c{i}", d, n) for i, (d, n) in enumerate(zip(deltas, counts, strict=True)))
    )
    want = params + eta * np.average(np.stack(deltas), axis=0, weights=counts)
    np.testing.assert_allclose(new.params, want, rtol=1e-5, atol=1e-5)
    assert new.round == 1 and metrics["aggregated"] == 3
    np.testing.assert_array_equal(state.params, params)  # the old state is untouched (a value)
