"""SecAgg parameters chosen for availability (Bell et al. 2020): the bounds against a simulation of the real
graph and checks, the simulation against the real protocol, and the config's choice and refusals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedtune.config import parse_config, secagg_bounds
from fedtune.config.privacy import SecAggConfig
from fedtune.errors import ConfigError
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg import availability
from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.driver import STAGES, SecureSummer, random_dropouts, run_protocol
from fedtune.privacy.secagg.messages import PublicParams
from fedtune.privacy.secagg.policy import ClientPolicy
from fedtune.privacy.secagg.quantize import field_for
from fedtune.privacy.secagg.server import SecAggServer
from fedtune.privacy.sums import SumPlan


def test_at_30_percent_dropout_100_clients_fewer_than_1_round_in_100_aborts() -> None:
    cfg = SecAggConfig(expected_dropout=0.3, failure_probability=0.01)
    params = SecureSummer(cfg, seed=0).params(SumPlan(round=1, numel=4), 100)
    assert 2 <= params.neighbours < 99 and params.threshold > 0.5  # SecAgg+, not the complete graph
    rate = availability.simulate_aborts(100, params.neighbours, params.threshold, 0.3, 400, np.random.default_rng(1))
    assert rate < 0.01
    # the old defaults (k = 8, threshold 2/3) abort almost every such round
    old = availability.simulate_aborts(100, 8, 2 / 3, 0.3, 50, np.random.default_rng(1))
    assert old > 0.5


@pytest.mark.parametrize(
    ("n", "k", "threshold", "dropout"), [(30, 8, 0.55, 0.2), (40, 0, 0.51, 0.4), (60, 12, 0.6, 0.1)]
)
def test_the_bound_holds_against_the_simulation(n: int, k: int, threshold: float, dropout: float) -> None:
    rate = availability.simulate_aborts(n, k, threshold, dropout, 300, np.random.default_rng(2))
    bound = secagg_bounds.abort_bound(n, k, threshold, dropout)
    assert rate <= bound + 4 * np.sqrt(bound * (1 - bound) / 300) + 1e-9, (rate, bound)


def test_the_simulation_predicts_each_real_protocol_round() -> None:
    """The same dropout pattern and graph seed: the real protocol aborts exactly when the simulation says so."""
    n, k, threshold = 10, 4, 0.55  # t = 3 of 4 neighbours
    ids = [f"c{i:02d}" for i in range(n)]
    spec = field_for(n, value_bits=None)
    outcomes = []
    for r in range(24):
        seed = r.to_bytes(8, "little")
        params = PublicParams(1, 4, False, (), 1.0, 0.0, spec.modulus_bits, spec.levels, threshold, k, seed)
        rng = np.random.default_rng(r)
        clients = {c: SecAggClient(c, rng.uniform(-1, 1, 4).astype(np.float32), params, rng=rng) for c in ids}
        drops = random_dropouts(ids, 0.25, np.random.default_rng([r, 1]))
        stage = np.array([STAGES.index(drops[c]) if c in drops else len(STAGES) for c in ids])
        try:
            run_protocol(clients, SecAggServer(params, ids), drop_before=drops)
            aborted = False
        except SecAggAbort:
            aborted = True
        assert aborted == availability.round_aborts(ids, stage, k, threshold, seed=seed), (r, drops)
        outcomes.append(aborted)
    assert 0 < sum(outcomes) < len(outcomes)  # both outcomes were exercised


def test_plan_is_the_smallest_degree_meeting_the_target() -> None:
    p = secagg_bounds.plan(100, dropout=0.3, failure_probability=0.01)
    assert p.abort_bound <= 0.01 and p.split_bound <= 0.01 and p.chosen
    smaller = secagg_bounds.plan(100, dropout=0.3, failure_probability=0.01, neighbours=p.neighbours - 2)
    assert smaller.abort_bound > 0.01
    # no dropout: the sparsest ring; few clients: the complete graph
    assert secagg_bounds.plan(50, dropout=0.0, failure_probability=0.01).neighbours == 2
    assert secagg_bounds.plan(8, dropout=0.2, failure_probability=0.01).neighbours == 0


def _config(**secagg) -> object:
    return parse_config(
        {
            "federation": {"clients_per_round": 100},
            "privacy": {"secure_aggregation": {"expected_dropout": 0.3, **secagg}},
        }
    )


def test_explicit_parameters_are_checked_against_the_target() -> None:
    _config()  # chosen: fine
    _config(neighbours=90)  # explicit and available enough
    with pytest.raises(ConfigError, match=r"neighbours=8 and threshold=0\.666"):
        _config(neighbours=8, threshold=2 / 3)
    with pytest.raises(ConfigError, match="failure_probability"):
        _config(threshold=0.9)


@pytest.mark.parametrize("dropout", [0.05, 0.3])
def test_clients_accept_the_automatic_plan_and_refuse_a_weaker_graph(dropout: float) -> None:
    """The client's floors (policy.ClientPolicy.from_config) recompute the security bound from the roster's
    size and the client's own targets: the server's automatic k and threshold always pass, also when fewer
    clients than invited reach the roster; a graph just below the bound, or a threshold at 1/2, is refused."""
    cfg = SecAggConfig(expected_dropout=dropout, failure_probability=0.01)
    policy = ClientPolicy.from_config(cfg, seed=7, round_idx=1)
    checked = 0
    for invited in (5, 12, 40, 100, 300):
        params = SecureSummer(cfg, seed=7).params(SumPlan(round=1, numel=4), invited)
        policy.check_params(params, "a")
        for roster in {invited, max(3, invited - 3), max(3, int(invited * (1 - dropout)))}:
            policy.check_roster(params, roster, "a")
            need = secagg_bounds.secure_degree(roster, dropout, 0.01)
            if need > 2 and params.neighbours:  # a SecAgg+ graph: one step weaker is refused
                weaker = replace(params, neighbours=need - 2)
                with pytest.raises(SecAggAbort, match="survivor graph could split"):
                    policy.check_roster(weaker, roster, "a")
                checked += 1
    assert checked >= 2  # the refusal was exercised, not only the acceptance
    with pytest.raises(SecAggAbort, match="threshold"):
        policy.check_params(replace(params, threshold=0.5), "a")
    # a client that expects more dropouts than the server planned for refuses the server's smaller graph
    params = SecureSummer(SecAggConfig(expected_dropout=0.05), seed=7).params(SumPlan(round=1, numel=4), 300)
    wary = ClientPolicy.from_config(SecAggConfig(expected_dropout=0.6), seed=7, round_idx=1)
    with pytest.raises(SecAggAbort, match="survivor graph could split"):
        wary.check_roster(params, 300, "a")


def test_the_collusion_bound_holds_against_random_corruption_of_the_real_graph() -> None:
    """Each client corrupted with probability gamma on the real Harary graph: the share of rounds where some
    neighbourhood holds 2t - k corrupted clients stays below the union bound the threshold is chosen by."""
    from fedtune.privacy.secagg.graph import neighbour_graph

    n, k, gamma = 60, 20, 0.1
    ids = [f"c{i:02d}" for i in range(n)]
    for threshold in (0.55, 0.7):
        t = secagg_bounds.shares_needed(threshold, k)
        rng, hits = np.random.default_rng(3), 0
        for r in range(400):
            graph = neighbour_graph(ids, k=k, seed=r.to_bytes(8, "little"))
            bad = {c for c in ids if rng.random() < gamma}
            hits += any(len(graph[c] & bad) >= 2 * t - k for c in ids)
        bound = secagg_bounds.collusion_bound(n, k, threshold, gamma)
        assert hits / 400 <= bound + 4 * np.sqrt(max(bound, 1e-3) / 400), (threshold, hits, bound)
        if threshold == 0.55:
            assert hits > 0  # t just above k/2: corrupted neighbourhoods do occur (the test can fail)


def test_expected_corrupt_raises_the_threshold_and_clients_refuse_a_lower_one() -> None:
    safe = SecAggConfig(expected_dropout=0.3, failure_probability=0.01, expected_corrupt=0.05)
    params = SecureSummer(safe, seed=7).params(SumPlan(round=1, numel=4), 100)
    k = secagg_bounds.degree(100, params.neighbours)
    t = secagg_bounds.shares_needed(params.threshold, k)
    assert 2 * t - k > 4 and secagg_bounds.collusion_bound(100, params.neighbours, params.threshold, 0.05) <= 0.01
    wary = ClientPolicy.from_config(safe, seed=7, round_idx=1)
    wary.check_params(params, "a")
    wary.check_roster(params, 100, "a")  # the server's own choice passes the client's recomputation
    naive = SecureSummer(SecAggConfig(expected_dropout=0.3), seed=7).params(SumPlan(round=1, numel=4), 100)
    with pytest.raises(SecAggAbort, match="2t - k colluding"):
        wary.check_roster(naive, 100, "a")  # t just above k/2: refused by a client that expects corruption
    with pytest.raises(ConfigError, match="expected_corrupt"):
        parse_config(
            {
                "federation": {"clients_per_round": 100},
                "privacy": {"secure_aggregation": {"threshold": 0.51, "neighbours": 40, "expected_corrupt": 0.1}},
            }
        )
