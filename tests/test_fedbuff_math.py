"""FedBuff's math against hand-computed oracles: staleness weights, the buffered fold, one server step, DP."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregation.clip import clip_l2
from fedtune.aggregation.fedavg import WeightedSum
from fedtune.aggregation.fedbuff import StalenessWeight, buffered_step
from fedtune.aggregation.server_opt import make_server_optimizer
from fedtune.config.privacy import DPConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.privacy.noise import gaussian
from fedtune.server.fedbuff import Arrival, FedBuff

# (rule, a, b, tau, value computed by hand)
WEIGHTS = [
    ("sqrt", 0.5, 4, 0, 1.0),
    ("sqrt", 0.5, 4, 3, 0.5),  # 1 / sqrt(4)
    ("sqrt", 0.5, 4, 8, 1 / 3),  # 1 / sqrt(9)
    ("constant", 0.5, 4, 7, 1.0),
    ("polynomial", 2.0, 4, 1, 0.25),  # (1 + 1)^-2
    ("polynomial", 0.5, 4, 15, 0.25),  # 16^-0.5
    ("hinge", 1.0, 2, 2, 1.0),  # tau <= b: no discount
    ("hinge", 1.0, 2, 4, 1 / 3),  # 1 / (1 * (4 - 2) + 1)
    ("hinge", 0.5, 0, 6, 0.25),  # 1 / (0.5 * 6 + 1)
]


@pytest.mark.parametrize(("rule", "a", "b", "tau", "expected"), WEIGHTS)
def test_staleness_weights_match_the_formulas(rule, a, b, tau, expected):
    assert StalenessWeight(rule, a=a, b=b)(tau) == pytest.approx(expected, rel=1e-15)


def test_staleness_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown staleness rule"):
        StalenessWeight("linear")
    with pytest.raises(ValueError, match="negative"):
        StalenessWeight()(-1)


def test_buffered_fold_equals_a_hand_computed_oracle():
    # three arrivals: (delta, examples, staleness); sqrt rule: s = 1, 1/2, 1/3
    arrivals = [
        (np.array([3.0, 0.0, -6.0], np.float32), 2.0, 0),
        (np.array([4.0, 8.0, 0.0], np.float32), 1.0, 3),
        (np.array([-9.0, 3.0, 3.0], np.float32), 3.0, 8),
    ]
    # sum s w d = 1*2*[3,0,-6] + 0.5*1*[4,8,0] + (1/3)*3*[-9,3,3] = [6-0+2-9, 0+4+3, -12+0+3] = [-1, 7, -9]
    # divided by sum w = 6 (the paper's normalisation: staleness weights are not in the denominator)
    expected = np.array([-1 / 6, 7 / 6, -9 / 6], np.float32)
    np.testing.assert_array_equal(buffered_step(arrivals, StalenessWeight("sqrt"), 3), expected)


def test_uniform_weights_give_the_papers_one_over_k():
    deltas = [np.array([1.0, 2.0], np.float32), np.array([3.0, -2.0], np.float32)]
    out = buffered_step([(deltas[0], 1.0, 0), (deltas[1], 1.0, 1)], StalenessWeight("sqrt"), 2)
    paper = (deltas[0] * 1.0 + deltas[1] / math.sqrt(2)) / 2  # Nguyen et al. 2022, Algorithm 1: (1/K) sum s d
    np.testing.assert_allclose(out, paper, rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(-100, 100, width=32), min_size=4, max_size=4),
            st.integers(1, 50),
            st.integers(0, 20),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["sqrt", "constant", "polynomial", "hinge"]),
)
def test_fold_matches_numpy_and_leaves_inputs_alone(items, rule):
    weight_rule = StalenessWeight(rule, a=0.7, b=2)
    arrivals = [(np.array(d, np.float32), float(n), tau) for d, n, tau in items]
    copies = [a[0].copy() for a in arrivals]
    out = buffered_step(arrivals, weight_rule, 4)
    s = np.array([weight_rule(tau) for _, _, tau in arrivals])
    w = np.array([n for _, n, _ in arrivals])
    oracle = (np.stack([d.astype(np.float64) for d, _, _ in arrivals]) * (s * w)[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(out, oracle.astype(np.float32), rtol=1e-6, atol=1e-5)
    for (d, _, _), c in zip(arrivals, copies, strict=True):
        np.testing.assert_array_equal(d, c)


def test_fold_refuses_bad_weights_and_shapes():
    fold = WeightedSum(2, dtype=np.float64)  # the one weighted fold, with the staleness discount as its scale
    with pytest.raises(ValueError, match="shape"):
        fold.add(np.zeros(3, np.float32), 1.0, scale=1.0)
    with pytest.raises(ValueError, match="discount"):
        fold.add(np.zeros(2, np.float32), 1.0, scale=1.5)
    with pytest.raises(ValueError, match="no updates"):
        buffered_step([], StalenessWeight(), 2)


def _spec() -> ParamSpec:
    import torch

    from fedtune.client.weights import TrainableView

    return TrainableView(torch.nn.Linear(1, 1)).spec  # two values: weight and bias


def _update(cid: str, delta: list[float], n: int) -> ClientUpdate:
    return ClientUpdate(cid, 1, n, np.array(delta, np.float32), _spec().digest)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "yogi"])
def test_server_optimiser_steps_with_the_buffered_direction(optimizer):
    spec = _spec()
    opt = make_server_optimizer(optimizer, lr=0.5)
    server = FedBuff(optimizer=opt, staleness=StalenessWeight("sqrt"), buffer_size=2)
    state = server.init_state(np.array([1.0, -1.0], np.float32), spec)
    arrivals = [Arrival(_update("a", [2.0, 4.0], 1), 0), Arrival(_update("b", [4.0, -4.0], 3), 3)]
    new, metrics = server.step(state, arrivals)
    direction = np.array([(2 * 1 + 0.5 * 3 * 4) / 4, (4 * 1 - 0.5 * 3 * 4) / 4], np.float32)  # [2, -0.5]
    slots = {k.removeprefix("opt/"): v for k, v in state.arrays.items()}
    params, _ = opt.step(state.params, direction, slots)
    np.testing.assert_array_equal(new.params, params)
    assert new.round == 1 and metrics["aggregated"] == 2 and metrics["staleness_max"] == 3
    np.testing.assert_array_equal(state.params, [1.0, -1.0])  # the old state is untouched


def test_a_step_with_no_usable_arrival_keeps_the_model():
    server = FedBuff()
    state = server.init_state(np.array([1.0, 2.0], np.float32), _spec())
    new, metrics = server.step(state, [])
    assert new.round == 1 and metrics["aggregated"] == 0
    np.testing.assert_array_equal(new.params, state.params)


def _oracle_epsilon(z: float, steps: int, delta: float) -> float:
    """T unamplified Gaussian mechanisms of sensitivity 2C and std zC under replace-one adjacency."""
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.GaussianDpEvent(z / 2), steps)
    return acc.get_epsilon(delta)


def test_dp_step_clips_noises_over_k_and_charges_an_unamplified_gaussian():
    dp = DPConfig(clip=1.0, noise_multiplier=1.5, delta=1e-5)
    server = FedBuff(staleness=StalenessWeight("sqrt"), buffer_size=4, weighting="uniform", dp=dp, seed=7)
    spec = _spec()
    state = server.init_state(np.zeros(2, np.float32), spec)
    arrivals = [Arrival(_update("a", [3.0, 4.0], 10), 0), Arrival(_update("b", [0.3, 0.0], 2), 3)]
    new, metrics = server.step(state, arrivals)
    clipped = clip_l2(np.array([3.0, 4.0], np.float32), 1.0)[0].astype(np.float64)  # norm 5 -> 1
    noise = gaussian(2, 1.5, seed=7, scope=("fedbuff-dp-noise", 1))
    # uniform weights, K = 4 (the configured buffer, not the 2 that arrived)
    expected = ((clipped + 0.5 * np.array([0.3, 0.0], np.float32) + noise) / 4).astype(np.float32)
    np.testing.assert_array_equal(new.params, expected)
    assert metrics["epsilon"] == pytest.approx(_oracle_epsilon(1.5, 1, 1e-5), rel=1e-9)
    for _ in range(4):
        new, metrics = server.step(new, [])  # an empty buffer still releases noise and is charged
    assert metrics["epsilon"] == pytest.approx(_oracle_epsilon(1.5, 5, 1e-5), rel=1e-9)
    assert server.epsilon(new) == pytest.approx(metrics["epsilon"])


def test_dp_budget_stops_before_overspending():
    dp = DPConfig(clip=1.0, noise_multiplier=8.0, epsilon_budget=3.0)
    server = FedBuff(buffer_size=2, weighting="uniform", dp=dp)
    state = server.init_state(np.zeros(2, np.float32), _spec())
    steps = 0
    while server.should_stop(state) is None:
        state, _ = server.step(state, [])
        steps += 1
    assert steps > 0 and server.epsilon(state) <= 3.0 < _oracle_epsilon(8.0, steps + 1, dp.delta)


def test_the_buffered_step_goes_through_the_round_contract():
    """FedBuff is a sum strategy: the loop's aggregate_round forms its plan's sum (every summand discounted by
    its staleness, the weights not) with the same plain summer as a synchronous round, and apply_sum steps
    with FedOpt's step; the result equals the hand-computed buffered step."""
    from dataclasses import replace

    from fedtune.core.sums import Staleness
    from fedtune.privacy.sums import plain_sum
    from fedtune.server.loop import aggregate_round

    opt = make_server_optimizer("momentum", lr=0.5)
    server = FedBuff(optimizer=opt, staleness=StalenessWeight("polynomial", a=1.0), buffer_size=3)
    state = server.init_state(np.array([1.0, -1.0], np.float32), _spec()).evolve(round=4)
    assert server.needs.linear and server.sum_plan(state).staleness == Staleness(4, server.staleness)
    trained_on = {"a": 4, "b": 2, "c": 1}  # staleness 0, 2, 3: s = 1, 1/3, 1/4
    sent = [_update("a", [3.0, 0.0], 2), _update("b", [6.0, 3.0], 1), _update("c", [-8.0, 4.0], 4)]
    stamped = [replace(u, version=trained_on[u.client_id]) for u in sent]
    new, metrics = aggregate_round(server, state, iter(stamped), plain_sum)
    # sum s w d = [6, 0] + (1/3)[6, 3] + (1/4) 4 [-8, 4] = [0, 5]; over sum w = 7
    direction = np.array([0.0, 5 / 7], np.float32)
    slots = {k.removeprefix("opt/"): v for k, v in state.arrays.items()}
    np.testing.assert_array_equal(new.params, opt.step(state.params, direction, slots)[0])
    assert new.round == 5 and metrics["aggregated"] == 3
    with pytest.raises(ValueError, match="which model version"):  # a summand that cannot be discounted
        aggregate_round(server, state, iter(sent), plain_sum)
