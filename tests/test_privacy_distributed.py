"""Distributed DP (Skellam inside SecAgg): the noise's distribution, the sum's decoding, the accounting
against the exact Renyi divergence and against dp-accounting's Gaussian, refusals, and a run end to end."""

from __future__ import annotations

import io
import json
import math

import dp_accounting
import numpy as np
import pytest
from rich.console import Console
from scipy import stats
from scipy.special import logsumexp

from _models import DIGITS_CNN
from fedtune.config import parse_config
from fedtune.errors import ConfigError
from fedtune.privacy import accountant, distributed
from fedtune.privacy.ddp_client import DDP_KEY, config_plan
from fedtune.run.session import simulate

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
# the unit tests' federation: 3 rounds of 4 clients with distributed DP (their updates: 64 values)
UNIT_DDP = {
    "server": {"weighting": "uniform"},
    "federation": {"rounds": 3, "clients_per_round": 4},
    "privacy": {"dp": {"clip": 0.5, "noise_multiplier": 1.0, "distributed": True}, "secure_aggregation": True},
}


def test_skellam_noise_has_the_skellam_distribution() -> None:
    rng = np.random.default_rng(0)
    draws = distributed.skellam(400_000, 6.0, rng)
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 0.03 and draws.var() == pytest.approx(6.0, rel=0.02)  # ~8 and ~5 sd
    values, counts = np.unique(draws, return_counts=True)
    empirical = counts / draws.size
    exact = stats.skellam.pmf(values, 3.0, 3.0)
    assert np.max(np.abs(empirical - exact)) < 0.004  # sd of each cell <= 0.0008


def test_the_sum_of_client_shares_is_the_planned_noise_and_unbiased() -> None:
    """m clients' encoded vectors summed mod 2^32 and lifted: mean = the sum of the clipped inputs, noise
    variance = m mu_l, i.e. std z C for the planned m (what central DP-FedAvg adds)."""
    plan = distributed.make_plan(clip=1.0, noise_multiplier=1.3, dim=2000, planned_clients=5, max_clients=20)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=2000).astype(np.float32) * 0.01 for _ in range(5)]  # norms below C: not clipped
    total = np.zeros(2000, np.uint32)
    for x in xs:
        total += distributed.to_field(distributed.encode(x, plan, rng))  # uint32 wraps: arithmetic mod 2^32
    decoded = distributed.lift(total, plan)
    err = decoded - np.sum(xs, axis=0, dtype=np.float64)
    assert err.std() == pytest.approx(1.3, rel=0.05) and abs(err.mean()) < 5 * 1.3 / math.sqrt(2000)
    assert plan.noise_std(5) == pytest.approx(1.3)
    # negative sums survive the two's complement round trip
    big = distributed.encode(np.full(2000, -0.02, np.float32), plan, rng)
    assert distributed.lift(distributed.to_field(big), plan).mean() == pytest.approx(-0.02, abs=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        distributed.encode(np.full(2000, np.nan, np.float32), plan, rng)


def _exact_renyi(alpha: int, shift: int, variance: float) -> float:
    """D_alpha(Sk + shift || Sk) for the 1-D Skellam of the given variance, summed over its support."""
    k = np.arange(-200, 201)  # the mass beyond is below 1e-30 for these variances
    logp = stats.skellam.logpmf(k - shift, variance / 2, variance / 2)
    logq = stats.skellam.logpmf(k, variance / 2, variance / 2)
    ok = np.isfinite(logp) & np.isfinite(logq)
    return float(logsumexp(alpha * logp[ok] + (1 - alpha) * logq[ok]) / (alpha - 1))


@pytest.mark.parametrize(("shift", "variance"), [(1, 4.0), (2, 10.0), (3, 30.0), (5, 60.0)])
def test_skellam_rdp_bounds_the_exact_divergence(shift: int, variance: float) -> None:
    for alpha in (2, 3, 5, 8):
        exact = _exact_renyi(alpha, shift, variance)
        bound = distributed.skellam_rdp(alpha, float(shift), float(shift), variance)
        assert exact <= bound * (1 + 1e-9), (alpha, exact, bound)
        assert exact >= 0.5 * bound  # and not vacuous
        # its first term is the Gaussian mechanism's at the same variance
        gaussian = alpha * shift**2 / (2 * variance)
        assert gaussian <= bound


def test_fine_grained_skellam_epsilon_approaches_dp_accountings_gaussian() -> None:
    """At fine granularity the Skellam sum is the replace-one Gaussian mechanism (sensitivity 2C, std z C)."""
    plan = distributed.make_plan(clip=1.0, noise_multiplier=4.0, dim=10_000, planned_clients=8, max_clients=32)
    eps = accountant.epsilon([distributed.entry(plan, 8, 5)], 1e-5)
    ref = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(4.0 / 2), 5))
    gauss = ref.get_epsilon(1e-5)
    # integer orders only and the discretisation surcharge: never below, and here within 1e-4 above
    assert gauss <= eps <= gauss * (1 + 1e-4)
    # fewer survivors, less noise, more epsilon
    assert accountant.epsilon([distributed.entry(plan, 4, 5)], 1e-5) > eps


def test_calibration_meets_the_target_tightly() -> None:
    kw = {"rounds": 5, "clip": 0.5, "dim": 1000, "clients_per_round": 10, "expected_dropout": 0.2}
    z = distributed.noise_multiplier_for_epsilon(4.0, 1e-5, **kw)
    rest = {k: v for k, v in kw.items() if k != "rounds"}
    spent = lambda z: accountant.epsilon(  # noqa: E731
        [distributed.entry(p := distributed.plan_for(noise_multiplier=z, **rest), p.planned_clients, 5)], 1e-5
    )
    assert spent(z) <= 4.0 < spent(z * (1 - 1e-5))


def _config(tmp_path, *, dp: dict | None = None, secagg: object = True, federation: dict | None = None):
    return parse_config(
        {
            "seed": 3,
            "model": DIGITS_CNN,
            "data": {"source": "digits", "partition": {"kind": "iid", "num_clients": 8}},
            "federation": federation or {"rounds": 2, "clients_per_round": 5},
            "client": {"local_steps": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.1},
            "server": {"weighting": "uniform"},
            "eval": {"baseline": False, "max_clients": 2, "max_examples_per_client": 8},
            "run": {"out_dir": str(tmp_path), "plot": False},
            "privacy": {
                "dp": {"clip": 0.5, "noise_multiplier": 1.0, "distributed": True, **(dp or {})},
                "secure_aggregation": secagg,
            },
        }
    )


def test_combinations_that_cannot_be_accounted_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"needs privacy\.secure_aggregation"):
        _config(tmp_path, secagg=None)
    with pytest.raises(ConfigError, match="clients_per_round"):
        _config(tmp_path, federation={"rounds": 2, "fraction": 0.5})
    with pytest.raises(ConfigError, match="adaptive"):
        _config(tmp_path, dp={"adaptive": {}})
    with pytest.raises(ConfigError, match="value_bits"):
        _config(tmp_path, secagg={"value_bits": 16})
    with pytest.raises(ConfigError, match="accountant"):
        _config(tmp_path, dp={"accountant": "pld"})


def test_a_run_with_distributed_dp_reports_epsilon_every_round(tmp_path) -> None:
    cfg = _config(tmp_path)
    result = simulate(cfg, show_progress=False, console=Console(file=io.StringIO()))
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in logged if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    numel = result.state.spec.numel
    plan = config_plan(cfg.privacy.dp, rounds=2, clients_per_round=5, expected_dropout=0.1, dim=numel)
    ledger: list = []
    for r in rounds:  # each round charged at the noise shares of its survivors (Poisson: their number varies)
        shares = r["agg_secagg_survivors"]
        assert r["agg_ddp_noise_shares"] == shares >= 3
        ledger = accountant.append(ledger, distributed.entry(plan, shares))
        assert r["agg_epsilon"] == pytest.approx(accountant.epsilon(ledger, 1e-5), rel=1e-9)
        assert r["agg_dp_epsilon_round"] == pytest.approx(accountant.epsilon([distributed.entry(plan, shares)], 1e-5))
        assert r["agg_dp_noise_std"] == pytest.approx(plan.noise_std(shares))
    assert rounds[1]["agg_epsilon"] > rounds[0]["agg_epsilon"] > 0
    assert result.state.extra["dp"]["ledger"] == ledger
    assert np.isfinite(result.state.params).all()
    assert DDP_KEY == "ddp_integers"


def test_noised_integers_fill_the_secagg_vector_and_the_clipped_element_stays_zero() -> None:
    """Inside the real protocol: the clients' noised integers occupy the first d field elements, the
    clipped-value element (the last, main's encode_input) carries 0 from every client (a data-dependent count
    would be summed without noise), and the lifted sum is exactly the sum of the clients' integers."""
    from fedtune.privacy.errors import SecAggAbort
    from fedtune.privacy.secagg.client import SecAggClient, encode_input
    from fedtune.privacy.secagg.driver import Traffic, decode_sum, run_protocol
    from fedtune.privacy.secagg.messages import PublicParams
    from fedtune.privacy.secagg.quantize import field_for
    from fedtune.privacy.secagg.server import SecAggServer

    d, ids = 50, [f"c{i}" for i in range(5)]
    plan = distributed.make_plan(clip=1.0, noise_multiplier=1.0, dim=d, planned_clients=5, max_clients=20)
    spec = field_for(len(ids), value_bits=None)
    params = PublicParams(1, d, False, (), 1.0, 0.0, spec.modulus_bits, spec.levels, 0.6, 0, b"g" * 32)
    rng = np.random.default_rng(4)
    noised = {c: distributed.encode(rng.normal(size=d).astype(np.float32), plan, rng) for c in ids}
    zeros = np.zeros(d, np.float32)  # under distributed DP the float update is replaced by zeros
    one = encode_input(zeros, params, weight=1.0, channels=(), rng=rng, integers=noised["c0"])
    assert one.shape == (params.length,) == (d + 1,) and one[-1] == 0
    assert np.array_equal(one[:d], distributed.to_field(noised["c0"]))
    clients = {c: SecAggClient(c, zeros, params, integers=noised[c]) for c in ids}
    result = run_protocol(clients, SecAggServer(params, ids))
    assert result.total[d] == 0
    decoded = decode_sum(result, params, traffic=Traffic(), invited=len(ids), integers=plan)
    exact = np.sum([noised[c] for c in ids], axis=0) / plan.scale
    np.testing.assert_allclose(decoded.total, exact, rtol=0, atol=1e-12)
    assert "secagg_clipped_values" not in decoded.metrics  # no per-coordinate clipping under distributed DP
    with pytest.raises(SecAggAbort, match="non-finite"):  # a NaN is refused before anything is encoded
        SecAggClient("c0", np.full(d, np.nan, np.float32), params, integers=noised["c0"])


def test_an_aborted_distributed_dp_round_is_not_charged_and_the_next_is_charged_at_its_survivors() -> None:
    """As docs/PRIVACY.md says for both DP variants: a SecAgg abort releases nothing, so the ledger does not
    move; the next round that releases a noised sum is charged one Skellam entry at its actual survivors."""
    from fedtune.core.messages import ClientUpdate, FitInstruction
    from fedtune.core.params import ParamSpec
    from fedtune.privacy.ddp_client import DistributedNoise
    from fedtune.privacy.dp_fedavg import DPFedAvg
    from fedtune.privacy.secagg.driver import SecureSummer
    from fedtune.server.loop import aggregate_round
    from fedtune.server.strategies import FedOpt

    d = 64
    spec = ParamSpec(names=("w",), shapes=((d,),), dtypes=("float32",))
    cfg = parse_config(UNIT_DDP)
    sa = cfg.privacy.secure_aggregation
    dp = DPFedAvg(
        FedOpt(weighting="uniform"),
        cfg.privacy.dp,
        cfg.federation,
        seed=0,
        expected_dropout=sa.expected_dropout,
    )
    summer = SecureSummer(sa, seed=0)  # the loop forms the sum (round contract); the strategy applies it
    noise = DistributedNoise(cfg.privacy.dp, rounds=3, clients_per_round=4, expected_dropout=sa.expected_dropout)
    rng = np.random.default_rng(0)

    def noised(n: int) -> list[ClientUpdate]:
        ups = [ClientUpdate(f"c{i}", 1, 5, rng.normal(size=d).astype(np.float32) * 0.01, spec.digest) for i in range(n)]
        return [noise(u, FitInstruction(u.client_id, 1, np.zeros(d, np.float32), spec.digest, 0, {})) for u in ups]

    state = dp.begin_round(dp.init_state(np.zeros(d, np.float32), spec), population=8)
    after, metrics = aggregate_round(dp, state, iter(noised(2)), summer)  # two clients: below SecAgg's minimum of three
    assert "secagg_abort" in metrics and metrics["dp_charged"] == 0 and metrics["epsilon"] == 0.0
    assert after.extra["dp"]["ledger"] == [] and np.array_equal(after.params, state.params)
    final, metrics = aggregate_round(dp, dp.begin_round(after, population=8), iter(noised(4)), summer)
    plan = config_plan(cfg.privacy.dp, rounds=3, clients_per_round=4, expected_dropout=sa.expected_dropout, dim=d)
    assert metrics["dp_charged"] == 1 and metrics["ddp_noise_shares"] == 4
    assert final.extra["dp"]["ledger"] == [distributed.entry(plan, 4)]
    assert metrics["epsilon"] == pytest.approx(accountant.epsilon([distributed.entry(plan, 4)], 1e-5), rel=1e-12)


def test_the_participant_logs_its_worst_case_epsilon_with_its_noise_share_alone(caplog) -> None:
    """The run's epsilon trusts the other clients to add their Skellam shares; each participant logs what its
    own updates would cost if they did not: once for the whole run (a warning) and, after each round it
    trains, over the rounds it has noised so far. Oracle: the server's own ledger charged at one share."""
    import logging
    import re

    from fedtune.core.messages import ClientUpdate, FitInstruction
    from fedtune.core.params import ParamSpec
    from fedtune.privacy.ddp_client import DistributedNoise

    d = 64
    spec = ParamSpec(names=("w",), shapes=((d,),), dtypes=("float32",))
    cfg = parse_config(UNIT_DDP)
    dropout = cfg.privacy.secure_aggregation.expected_dropout
    plan = config_plan(cfg.privacy.dp, rounds=3, clients_per_round=4, expected_dropout=dropout, dim=d)
    noise = DistributedNoise(cfg.privacy.dp, rounds=3, clients_per_round=4, expected_dropout=dropout)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.INFO, logger="fedtune.privacy"):
        for rnd, cid in [(1, "c1"), (2, "c1"), (2, "c1"), (2, "c2")]:  # round 2 of c1 sent twice (a rejoin)
            update = ClientUpdate(cid, rnd, 5, rng.normal(size=d).astype(np.float32) * 0.01, spec.digest)
            noise(update, FitInstruction(cid, rnd, np.zeros(d, np.float32), spec.digest, 0, {}))

    def charged(shares: int, rounds: int) -> float:
        ledger: list = []
        for _ in range(rounds):
            ledger = accountant.append(ledger, distributed.entry(plan, shares))
        return accountant.epsilon(ledger, 1e-5)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"1/{plan.planned_clients} of the noise" in warnings[0]
    whole, planned = re.search(r"epsilon (\S+) at delta \S+ \((\S+) with the", warnings[0]).groups()
    assert float(whole) == pytest.approx(charged(1, 3), rel=1e-3)
    assert float(planned) == pytest.approx(charged(plan.planned_clients, 3), rel=1e-3)
    assert float(whole) > 2 * float(planned)  # one share of three: much less noise
    pattern = re.compile(r"client (\S+) after round (\d+): epsilon <= (\S+) at delta \S+ over its (\d+) noised")
    running = [
        m.groups() for r in caplog.records if r.levelno == logging.INFO and (m := pattern.search(r.getMessage()))
    ]
    assert [(c, rnd, n) for c, rnd, _, n in running] == [
        ("c1", "1", "1"),
        ("c1", "2", "2"),
        ("c1", "2", "2"),
        ("c2", "2", "1"),
    ]
    for _, _, eps, n in running:
        assert float(eps) == pytest.approx(charged(1, int(n)), rel=1e-3)


def test_a_participant_refuses_a_server_that_changes_what_its_noise_share_is_sized_by() -> None:
    """Over gRPC a participant with its own --config sizes its Skellam share from clients_per_round and the
    rounds (target_epsilon); a server announcing more clients would shrink every share, so it is refused."""
    from fedtune.deploy.participant import ParticipantError, check_pinned

    def cfg(**federation):
        return parse_config(
            {
                "server": {"weighting": "uniform"},
                "federation": {"rounds": 3, "clients_per_round": 5, **federation},
                "privacy": {
                    "dp": {"clip": 0.5, "target_epsilon": 4.0, "distributed": True},
                    "secure_aggregation": True,
                },
            }
        )

    mine = cfg()
    check_pinned(mine, cfg())
    with pytest.raises(ParticipantError, match=r"federation\.clients_per_round=500"):
        check_pinned(mine, cfg(clients_per_round=500))
    with pytest.raises(ParticipantError, match=r"federation\.rounds=1"):
        check_pinned(mine, cfg(rounds=1))
    central = {"server": {"weighting": "uniform"}, "privacy": {"dp": {"noise_multiplier": 1.0}}}
    check_pinned(parse_config(central), parse_config({**central, "federation": {"rounds": 9}}))  # central: not pinned
