"""Robust aggregation: the rules against numpy oracles, their invariants, and attacks that break FedAvg."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedtune.aggregation.robust import (
    coordinate_median,
    krum_scores,
    krum_select,
    make_aggregator,
    trimmed_mean,
)
from fedtune.client.worker import evaluate_examples
from fedtune.server.build import build_strategy
from fedtune.server.loop import run_rounds
from fedtune.transport.inprocess import InProcessTransport
from test_strategies_support import ArrayTask, classification_records, make_config, make_worker, seeded

stacks = st.integers(3, 9).flatmap(
    lambda k: st.lists(arrays(np.float32, 4, elements=st.floats(-100, 100, width=32)), min_size=k, max_size=k)
)


@settings(max_examples=60, deadline=None)
@given(stacks)
def test_median_and_trimmed_mean_against_numpy_and_within_the_range(deltas):
    stack = np.stack(deltas).astype(np.float64)
    np.testing.assert_allclose(coordinate_median(deltas), np.median(stack, axis=0), rtol=1e-6, atol=1e-5)
    k = int(np.floor(0.2 * len(deltas)))
    oracle = np.array([np.sort(col)[k : len(col) - k].mean() for col in stack.T])
    np.testing.assert_allclose(trimmed_mean(deltas, 0.2), oracle, rtol=1e-5, atol=1e-4)
    for rule in (coordinate_median(deltas), trimmed_mean(deltas, 0.2)):
        assert (rule >= stack.min(axis=0) - 1e-4).all() and (rule <= stack.max(axis=0) + 1e-4).all()


@settings(max_examples=40, deadline=None)
@given(stacks, st.randoms(use_true_random=False))
def test_rules_are_permutation_invariant_and_do_not_modify_inputs(deltas, rnd):
    copies = [d.copy() for d in deltas]
    shuffled = list(deltas)
    rnd.shuffle(shuffled)
    np.testing.assert_allclose(coordinate_median(deltas), coordinate_median(shuffled), rtol=1e-6)
    np.testing.assert_allclose(trimmed_mean(deltas, 0.2), trimmed_mean(shuffled, 0.2), rtol=1e-5, atol=1e-4)
    for d, c in zip(deltas, copies, strict=True):
        np.testing.assert_array_equal(d, c)


def test_trimmed_mean_with_nothing_trimmed_is_the_mean():
    deltas = [np.array([1, 2], np.float32), np.array([3, 10], np.float32), np.array([5, 0], np.float32)]
    np.testing.assert_allclose(trimmed_mean(deltas, 0.0), np.mean(deltas, axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="leaves no value"):
        trimmed_mean(deltas[:2], 0.5)


def test_krum_scores_against_a_brute_force_oracle():
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=5).astype(np.float32) for _ in range(7)]
    f = 2
    ours = krum_scores(deltas, f)
    for i, d in enumerate(deltas):
        dists = sorted(float(np.sum((d.astype(np.float64) - e) ** 2)) for j, e in enumerate(deltas) if j != i)
        assert ours[i] == pytest.approx(sum(dists[: len(deltas) - f - 2]), rel=1e-9)
    with pytest.raises(ValueError, match="2f \\+ 2"):
        krum_scores(deltas[:6], 2)


def test_norm_bounded_mean_clips_with_the_one_l2_clip():
    """norm_bounded_mean clips by clip_l2 (the safety margin keeps the norm at or below the bound)."""
    fold = make_aggregator("norm_bounded_mean", norm_bound=1.0).fold(2)
    fold.add(np.array([3, 4], np.float32), 1.0)
    fold.add(np.zeros(2, np.float32), 1.0)
    mean, metrics = fold.result()
    assert metrics == {"clipped": 1}
    assert np.linalg.norm(mean * 2) <= 1.0 and np.linalg.norm(mean * 2) == pytest.approx(1.0, rel=1e-5)


# --------------------------------------------------------------------------------------------- attacks


def honest_and_attacked(seed=0, k=10, bad=3, attack="sign_flip"):
    """Honest clients send g + noise; ``bad`` of them send -10 g (sign-flipped, scaled) or 50 g."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=50).astype(np.float32)
    deltas = [g + 0.3 * rng.normal(size=50).astype(np.float32) for _ in range(k)]
    scale = -10.0 if attack == "sign_flip" else 50.0
    for i in range(bad):
        deltas[i] = (scale * g).astype(np.float32)
    return g, deltas


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("attack", ["sign_flip", "scaled"])
def test_robust_rules_hold_where_the_mean_breaks(attack):
    g, deltas = honest_and_attacked(attack=attack)
    weights = [1.0] * len(deltas)
    rules = {
        "mean": make_aggregator("mean"),
        "median": make_aggregator("median"),
        "trimmed_mean": make_aggregator("trimmed_mean", trim_fraction=0.3),
        "krum": make_aggregator("krum", num_byzantine=3),
        "multi_krum": make_aggregator("multi_krum", num_byzantine=3),
        "norm_bounded_mean": make_aggregator("norm_bounded_mean", norm_bound=float(np.linalg.norm(g)) * 1.1),
    }
    results = {}
    for name, agg in rules.items():
        fold = agg.fold(g.size)
        for d, w in zip(deltas, weights, strict=True):
            fold.add(d, w)
        results[name] = fold.result()[0]
    error = {name: float(np.linalg.norm(r - g) / np.linalg.norm(g)) for name, r in results.items()}
    assert error["mean"] > 1.5  # the attackers own the average
    for name in ("median", "trimmed_mean", "krum", "multi_krum"):
        assert error[name] < 0.35, (name, error)
        assert cosine(results[name], g) > 0.95
    # norm bounding limits the damage of each attacker but cannot remove it: direction stays positive
    # for scaled updates and degrades for sign flips (3 attackers at full norm against 7 honest)
    assert cosine(results["norm_bounded_mean"], g) > (0.9 if attack == "scaled" else 0.2)
    assert krum_select(deltas, 3, 7) and all(i >= 3 for i in krum_select(deltas, 3, 7))


def poison(bad_ids, factor):
    """An update transform that turns some clients malicious: delta <- factor * delta."""

    def transform(update, instr):
        if update.client_id in bad_ids:
            return replace(update, delta=(factor * update.delta).astype(np.float32))
        return update

    return transform


@pytest.mark.parametrize("aggregator", ["mean", "median", "trimmed_mean", "krum"])
def test_end_to_end_attack_on_a_classifier(aggregator):
    """2 of 8 clients send -8x their real update every round: FedAvg diverges, the robust rules still learn."""
    records = classification_records(8, skew=False)
    server = {"aggregator": aggregator}
    if aggregator == "trimmed_mean":
        server["trim_fraction"] = 0.25
    if aggregator == "krum":
        server["num_byzantine"] = 2
    config = make_config(
        server=server,
        federation={"rounds": 6, "clients_per_round": 8},
        client={"local_steps": 4, "lr": 0.3},
        eval={"every": 100},
    )
    task = ArrayTask(seeded(lambda: torch.nn.Linear(6, 3)))
    worker = make_worker(task, records)
    worker.update_transforms.append(poison({"c0", "c1"}, -8.0))
    strategy = build_strategy(config)
    state = strategy.init_state(worker.current_params(), worker.view.spec)
    state = run_rounds(config, strategy, InProcessTransport(worker), state)
    worker.view.write(state.params)
    test = [e for cid in records for e in worker.examples(cid, train=False)]
    accuracy = evaluate_examples(task, test, 64).metrics(accuracy=True)["accuracy"]
    if aggregator == "mean":
        assert accuracy < 0.6, accuracy
    else:
        assert accuracy > 0.85, (aggregator, accuracy)
