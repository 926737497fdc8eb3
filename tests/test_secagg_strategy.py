"""SecAgg inside the strategies: the secure sum equals the plain one up to quantisation, example
weighting, DP's norm bound after rounding, dropouts and aborts handled by the wrappers."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.config import parse_config
from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.privacy.dp_fedavg import DPFedAvg
from fedtune.privacy.secagg.client import encode_input
from fedtune.privacy.secagg.driver import SecureSummer
from fedtune.privacy.secagg.quantize import step
from fedtune.privacy.secagg.strategy import SecureAggregation
from fedtune.privacy.sums import SumPlan, plain_sum
from fedtune.server.loop import aggregate_round
from fedtune.server.strategies import FedOpt

D = 300
SPEC = ParamSpec(names=("w",), shapes=((D,),), dtypes=("float32",))


def updates(n: int, *, scale: float = 0.3) -> list[ClientUpdate]:
    rng = np.random.default_rng(7)
    return [
        ClientUpdate(f"c{i:02d}", 1, 5 * (i + 1), rng.uniform(-scale, scale, D).astype(np.float32), SPEC.digest)
        for i in range(n)
    ]


def test_secure_sum_matches_plain_sum_within_quantisation() -> None:
    ups = updates(8)
    plan = SumPlan(round=1, numel=D, coord_bound=1.0)
    secure = SecureSummer(SecAggConfig(neighbours=4), seed=0)(ups, plan)
    plain = plain_sum(ups, plan)
    levels = (2**32 - 1) // 8
    assert secure.count == plain.count == 8 and secure.weight == 8.0
    np.testing.assert_allclose(secure.total, plain.total, atol=8 * 2 / levels)
    assert secure.metrics["secagg_field_bits"] == 32 and secure.metrics["secagg_bytes_up_per_client"] > 4 * D


def test_secure_aggregation_wrapper_gives_fedavgs_weighted_mean() -> None:
    ups = updates(6)
    cfg = SecAggConfig(weight_cap=1000, value_bits=20)
    wrapped = SecureAggregation(FedOpt(weighting="examples"), cfg, weighting="examples")
    state = wrapped.init_state(np.zeros(D, np.float32), SPEC)
    secure_state, metrics = aggregate_round(wrapped, state, iter(ups), SecureSummer(cfg, seed=1))
    plain_state, _ = FedOpt(weighting="examples").aggregate(state, ups)
    np.testing.assert_allclose(secure_state.params, plain_state.params, atol=1e-4)
    assert metrics["aggregated"] == 6 and metrics["secagg_survivors"] == 6


def test_dp_norm_bound_survives_rounding() -> None:
    """Quantised values keep ||x_q|| <= C (the client shrinks by sqrt(d) * step first)."""
    summer = SecureSummer(SecAggConfig(value_bits=10), seed=0)
    plan = SumPlan(round=1, numel=D, l2_bound=0.5, coord_bound=0.5)
    params = summer.params(plan, 4)
    x = np.full(D, 0.5 / np.sqrt(D), np.float32)  # exactly on the bound
    for seed in range(5):
        q = encode_input(x, params, weight=1.0, channels=[], rng=np.random.default_rng(seed))
        back = q[:D].astype(np.float64) * step(-0.5, 0.5, params.levels) - 0.5  # then the clipped fraction
        assert np.linalg.norm(back) <= 0.5


def test_dp_with_secagg_agrees_with_dp_without_and_survives_dropouts() -> None:
    base = {"server": {"weighting": "uniform"}, "federation": {"rounds": 3, "fraction": 0.2}}
    cfg = parse_config({**base, "privacy": {"dp": {"clip": 1.0, "noise_multiplier": 1.0}}})
    secagg = SecAggConfig(simulate_dropout=0.0)
    plain = DPFedAvg(FedOpt(weighting="uniform"), cfg.privacy.dp, cfg.federation, seed=4)
    secure = DPFedAvg(FedOpt(weighting="uniform"), cfg.privacy.dp, cfg.federation, seed=4)
    state = plain.begin_round(plain.init_state(np.zeros(D, np.float32), SPEC), population=40)
    ups = updates(8)
    a, _ = plain.aggregate(state, ups)
    b, metrics = aggregate_round(secure, state, iter(ups), SecureSummer(secagg, seed=4))
    np.testing.assert_allclose(a.params, b.params, atol=1e-6)  # same noise (seeded), sums agree
    assert metrics["epsilon"] > 0 and metrics["secagg_survivors"] == 8
    dropping = SecureSummer(SecAggConfig(simulate_dropout=0.3, neighbours=6), seed=4)
    _, metrics = aggregate_round(secure, state, iter(updates(12)), dropping)
    assert metrics.get("secagg_dropped", 0) > 0 or "secagg_abort" in metrics


def test_an_aborted_secagg_round_keeps_the_model_and_is_not_charged() -> None:
    """An abort releases nothing (no sum is unmasked, no noise added): the ledger does not move; the next
    round that does release a noised sum is charged exactly once."""
    cfg = parse_config(
        {
            "server": {"weighting": "uniform"},
            "federation": {"fraction": 0.2},
            "privacy": {"dp": {"noise_multiplier": 1.0}},
        }
    )
    dp = DPFedAvg(FedOpt(weighting="uniform"), cfg.privacy.dp, cfg.federation, seed=0)
    state = dp.begin_round(dp.init_state(np.zeros(D, np.float32), SPEC), population=10)
    summer = SecureSummer(SecAggConfig(), seed=0)
    new_state, metrics = aggregate_round(dp, state, iter(updates(2)), summer)  # two: below SecAgg's minimum of 3
    assert "aborted" in metrics["secagg_abort"] and metrics["aggregated"] == 0
    assert np.array_equal(new_state.params, state.params) and new_state.round == 1
    assert new_state.extra["dp"]["ledger"] == [] and metrics["epsilon"] == 0.0 and metrics["dp_charged"] == 0
    state = dp.begin_round(new_state, population=10)
    final, metrics = dp.aggregate(state, updates(4, scale=0.01))
    assert metrics["aggregated"] == 4 and metrics["dp_charged"] == 1
    assert final.extra["dp"]["ledger"] == [{"sampling": "poisson", "q": 0.2, "z": 1.0, "count": 1}]
    assert metrics["epsilon"] == pytest.approx(dp.epsilon(final)) and metrics["epsilon"] > 0


def test_secure_aggregation_refuses_krum() -> None:
    from fedtune.aggregation.robust import make_aggregator
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="krum"):
        SecureAggregation(
            FedOpt(aggregator=make_aggregator("krum", num_byzantine=1)),
            SecAggConfig(),
            weighting="uniform",
        )
