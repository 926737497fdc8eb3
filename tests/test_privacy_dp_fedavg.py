"""DP-FedAvg against NumPy oracles: clipping, noise (value, std, seed), accounting, dropouts, adaptive
clipping, resume, the budget stop, and Poisson sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pytest
from scipy import stats

from fedtune.config import parse_config
from fedtune.config.schema import ClientConfig
from fedtune.core.messages import ClientEval, ClientUpdate, EvalInstruction, FitInstruction
from fedtune.core.params import ParamSpec
from fedtune.core.rng import derive_rng
from fedtune.core.sampling import poisson_sample
from fedtune.core.state import load_state, save_state
from fedtune.errors import ConfigError
from fedtune.privacy import accountant, adaptive
from fedtune.privacy.client_clip import dp_clip_transform
from fedtune.privacy.dp_fedavg import UNCLIPPED, DPFedAvg
from fedtune.server.loop import run_rounds
from fedtune.server.strategies import FedOpt
from fedtune.tasks.base import EvalSums

D = 64
SPEC = ParamSpec(names=("w",), shapes=((D,),), dtypes=("float32",))


def config(dp: dict | None = None, *, rounds: int = 5, fraction: float = 0.1, seed: int = 3, **extra):
    dp = {"clip": 1.0, "noise_multiplier": 1.2, **(dp or {})}
    return parse_config(
        {
            "seed": seed,
            "federation": {"rounds": rounds, "fraction": fraction},
            "server": {"weighting": "uniform"},
            "eval": {"baseline": False, "every": 1000},
            "privacy": {"dp": dp},
            **extra,
        }
    )


def strategy(cfg) -> DPFedAvg:
    return DPFedAvg(FedOpt(weighting="uniform"), cfg.privacy.dp, cfg.federation, seed=cfg.seed)


def updates(n: int, round_idx: int = 1, scale: float = 1.0, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(f"c{i}", round_idx, 10 + i, (rng.normal(size=D) * scale * (i + 1)).astype(np.float32), SPEC.digest)
        for i in range(n)
    ]


def begun(dp: DPFedAvg, population: int = 50):
    return dp.begin_round(dp.init_state(np.zeros(D, np.float32), SPEC), population=population)


def oracle_clip(x: np.ndarray, c: float) -> np.ndarray:
    return x * min(1.0, c / np.linalg.norm(x.astype(np.float64)))


def test_aggregate_matches_numpy_oracle() -> None:
    cfg = config()
    dp = strategy(cfg)
    state = begun(dp)  # q = 0.1 of 50: 5 expected clients
    ups = updates(5)
    copies = [u.delta.copy() for u in ups]
    new_state, metrics = dp.aggregate(state, ups)
    clipped_sum = sum(oracle_clip(u.delta, 1.0) for u in ups)
    noise = derive_rng(cfg.seed, "dp-noise", 1).standard_normal(D) * 1.2 * 1.0
    np.testing.assert_allclose(new_state.params, (clipped_sum + noise) / 5.0, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(u.delta, c) for u, c in zip(ups, copies, strict=True))  # inputs untouched
    assert metrics["aggregated"] == 5 and metrics["dp_expected_clients"] == 5.0
    assert metrics["epsilon"] == pytest.approx(accountant.epsilon([accountant.poisson_entry(0.1, 1.2)], 1e-5))
    assert new_state.extra["dp"]["ledger"] == [accountant.poisson_entry(0.1, 1.2, 1)]
    assert state.extra["dp"]["ledger"] == []  # the old state is a value: unchanged


def test_noise_std_on_released_aggregate() -> None:
    """Released = noise / m with zero updates: its std must be z C / m (a statistical test that can fail)."""
    n = 200_000
    spec = ParamSpec(names=("w",), shapes=((n,),), dtypes=("float32",))
    cfg = config({"clip": 0.7, "noise_multiplier": 1.5})
    dp = strategy(cfg)
    state = dp.begin_round(dp.init_state(np.zeros(n, np.float32), spec), population=40)  # m = 4
    zero = [ClientUpdate(f"c{i}", 1, 5, np.zeros(n, np.float32), spec.digest) for i in range(3)]
    new_state, metrics = dp.aggregate(state, zero)
    released = new_state.params.astype(np.float64) * 4.0
    sigma = 1.5 * 0.7
    assert metrics["dp_noise_std"] == pytest.approx(sigma)
    # the sample std of n normals has relative standard error 1 / sqrt(2n) ~ 0.0016
    assert released.std() == pytest.approx(sigma, rel=5 / np.sqrt(2 * n))
    assert abs(released.mean()) < 5 * sigma / np.sqrt(n)
    assert stats.kstest(released / sigma, "norm").pvalue > 1e-3


def test_seed_reaches_the_noise_and_secure_mode_does_not_replay() -> None:
    def released(seed: int, secure: bool = False) -> np.ndarray:
        cfg = config({"secure_rng": secure}, seed=seed)
        dp = strategy(cfg)
        return dp.aggregate(begun(dp), updates(3))[0].params

    assert np.array_equal(released(1), released(1))
    assert not np.array_equal(released(1), released(2))
    assert not np.array_equal(released(1, secure=True), released(1, secure=True))


def test_fewer_replies_keep_the_denominator_and_are_charged() -> None:
    cfg = config()
    dp = strategy(cfg)
    state = begun(dp)
    ups = updates(2)
    new_state, metrics = dp.aggregate(state, ups)
    noise = derive_rng(cfg.seed, "dp-noise", 1).standard_normal(D) * 1.2
    expected = (sum(oracle_clip(u.delta, 1.0) for u in ups) + noise) / 5.0  # still / 5, not / 2
    np.testing.assert_allclose(new_state.params, expected, rtol=1e-5, atol=1e-6)
    assert metrics["aggregated"] == 2 and new_state.extra["dp"]["ledger"][0]["count"] == 1
    # nobody replied: the noise is still released (and charged), never a silent skip
    empty_state, empty_metrics = dp.aggregate(state, [])
    assert empty_metrics["aggregated"] == 0 and np.abs(empty_state.params).sum() > 0


def test_server_reclips_an_unclipped_update() -> None:
    cfg = config({"noise_multiplier": 1e-9})
    dp = strategy(cfg)
    big = ClientUpdate("c0", 1, 5, np.full(D, 10.0, np.float32), SPEC.digest)
    new_state, metrics = dp.aggregate(begun(dp, population=10), [big])  # m = 1
    assert metrics["dp_server_reclipped"] == 1
    assert np.linalg.norm(new_state.params) == pytest.approx(1.0, rel=1e-5)


def test_client_transform_clips_and_reports_the_bit() -> None:
    instr = FitInstruction(
        "c0", 1, np.zeros(D, np.float32), SPEC.digest, 0, ClientConfig(), options={"dp_clip": 0.5, "dp_adaptive": True}
    )
    big = ClientUpdate("c0", 1, 5, np.full(D, 1.0, np.float32), SPEC.digest)
    out = dp_clip_transform(big, instr)
    assert np.linalg.norm(out.delta) <= 0.5 and out.extras[UNCLIPPED].tolist() == [0.0]
    small = ClientUpdate("c0", 1, 5, np.full(D, 0.01, np.float32), SPEC.digest)
    assert dp_clip_transform(small, instr).extras[UNCLIPPED].tolist() == [1.0]


def test_adaptive_clipping_follows_andrew_et_al() -> None:
    cfg = config(
        {"clip": 0.5, "noise_multiplier": 1.0, "adaptive": {"target_quantile": 0.5, "lr": 0.2, "count_noise": 2.0}}
    )
    dp = strategy(cfg)
    state = begun(dp)
    instr = FitInstruction(
        "x", 1, np.zeros(D, np.float32), SPEC.digest, 0, ClientConfig(), options=dp.fit_payload(state, "x")[1]
    )
    ups = [dp_clip_transform(u, instr) for u in updates(5, scale=0.001)]  # all fit under C: every bit is 1
    new_state, metrics = dp.aggregate(state, ups)
    count_noise = derive_rng(cfg.seed, "dp-count-noise", 1).standard_normal(1)[0] * 2.0
    fraction = (5 * 0.5 + count_noise) / 5.0 + 0.5
    assert metrics["dp_unclipped_fraction"] == pytest.approx(fraction)
    assert new_state.extra["dp"]["clip"] == pytest.approx(0.5 * np.exp(-0.2 * (fraction - 0.5)))
    assert metrics["dp_noise_std"] == pytest.approx(adaptive.update_noise_multiplier(1.0, 2.0) * 0.5)
    # the next round's clients are sent the new C
    assert dp.fit_payload(new_state, "c0")[1]["dp_clip"] == new_state.extra["dp"]["clip"]


class Clients:
    """A population replying with seeded random deltas, clipped client-side as a real client would."""

    def __init__(self, n: int) -> None:
        self.ids = [f"c{i:02d}" for i in range(n)]

    def client_ids(self) -> list[str]:
        return list(self.ids)

    def fit(self, instructions: Sequence[FitInstruction]) -> Iterator[ClientUpdate]:
        for instr in instructions:
            delta = derive_rng(0, "delta", instr.round, instr.client_id).normal(size=D).astype(np.float32)
            yield dp_clip_transform(ClientUpdate(instr.client_id, instr.round, 7, delta, SPEC.digest), instr)

    def evaluate(self, instructions: Sequence[EvalInstruction]) -> Iterator[ClientEval]:
        for instr in instructions:
            yield ClientEval(instr.client_id, instr.round, EvalSums(1.0, 1))

    def close(self) -> None:
        pass


def test_ledger_survives_a_checkpoint(tmp_path) -> None:
    cfg = config(rounds=3, fraction=0.3)
    dp = strategy(cfg)
    init = dp.init_state(np.zeros(D, np.float32), SPEC)
    straight = run_rounds(cfg, dp, Clients(20), init)
    two = run_rounds(config(rounds=2, fraction=0.3), dp, Clients(20), init)
    save_state(two, tmp_path / "ckpt", config_digest="x")
    resumed = run_rounds(cfg, dp, Clients(20), load_state(tmp_path / "ckpt"))
    assert np.array_equal(resumed.params, straight.params)
    assert resumed.extra["dp"] == straight.extra["dp"]
    assert dp.epsilon(resumed) == pytest.approx(accountant.epsilon([accountant.poisson_entry(0.3, 1.2, 3)], 1e-5))


def test_run_stops_cleanly_before_the_budget_is_exceeded() -> None:
    per_round = [accountant.epsilon([accountant.poisson_entry(0.3, 1.2, r)], 1e-5) for r in (1, 2, 3, 4)]
    budget = (per_round[2] + per_round[3]) / 2  # allows 3 rounds, not 4
    cfg = config({"epsilon_budget": budget}, rounds=10, fraction=0.3)
    dp = strategy(cfg)
    stops: list[str] = []
    final = run_rounds(
        cfg,
        dp,
        Clients(20),
        dp.init_state(np.zeros(D, np.float32), SPEC),
        on_stop=lambda s, reason: stops.append(reason),
    )
    assert final.round == 3 and len(stops) == 1
    assert "epsilon_budget" in stops[0] and dp.epsilon(final) <= budget


def test_target_epsilon_calibrates_the_noise_once() -> None:
    cfg = config({"noise_multiplier": None, "target_epsilon": 2.0}, rounds=20, fraction=0.2)
    dp = strategy(cfg)
    state = begun(dp, population=30)
    z = state.extra["dp"]["z"]
    assert dp.begin_round(state, population=30).extra["dp"]["z"] == z  # not recalibrated
    eps = accountant.epsilon([accountant.poisson_entry(0.2, z, 20)], 1e-5)
    assert 1.95 <= eps <= 2.0


def test_wrapper_refuses_an_aggregator_that_needs_individual_updates() -> None:
    from fedtune.aggregation.robust import make_aggregator

    cfg = config()
    with pytest.raises(ConfigError, match="median"):
        DPFedAvg(FedOpt(aggregator=make_aggregator("median")), cfg.privacy.dp, cfg.federation, seed=0)


def test_poisson_sampling_rate_seed_and_secure_mode() -> None:
    ids = [f"c{i}" for i in range(2000)]
    sizes = [len(poisson_sample(ids, seed=1, round_idx=r, rate=0.05)) for r in range(1, 41)]
    # Binomial(2000, 0.05): mean 100, sd ~9.7; the mean of 40 rounds is within 5 standard errors
    assert abs(np.mean(sizes) - 100) < 5 * 9.75 / np.sqrt(40)
    assert poisson_sample(ids, seed=1, round_idx=3, rate=0.05) == poisson_sample(ids, seed=1, round_idx=3, rate=0.05)
    assert poisson_sample(ids, seed=1, round_idx=3, rate=0.05) != poisson_sample(ids, seed=2, round_idx=3, rate=0.05)
    a, b = (poisson_sample(ids, seed=1, round_idx=3, rate=0.05, secure=True) for _ in range(2))
    assert a != b
