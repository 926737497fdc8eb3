"""The accountant against independent computations: dp-accounting used directly, and Opacus' own RDP code."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from opacus.accountants.analysis import rdp as opacus_rdp

from fedtune.privacy import accountant as acc

CASES = [
    (0.25, 1.1, 5, 1e-5),
    (0.01, 1.1, 1000, 1e-5),
    (0.1, 1.0, 100, 1e-5),
    (0.05, 0.8, 300, 1e-6),
    (0.3, 2.0, 50, 1e-4),
]


def _dp_accounting_eps(q: float, z: float, rounds: int, delta: float, orders: list | None = None) -> float:
    a = rdp.RdpAccountant(orders)  # None: dp-accounting's default orders
    a.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return a.get_epsilon(delta)


def _opacus_eps(q: float, z: float, rounds: int, delta: float) -> float:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]
    rdp_values = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    eps, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp_values, delta=delta)
    return eps


@pytest.mark.parametrize(("q", "z", "rounds", "delta"), CASES)
def test_epsilon_matches_dp_accounting_and_opacus(q: float, z: float, rounds: int, delta: float) -> None:
    ours = acc.epsilon([acc.poisson_entry(q, z, rounds)], delta)
    # dp-accounting's own orders, so its own epsilon to 1e-6 relative (the case: 5 rounds, q 0.25)
    assert ours == pytest.approx(_dp_accounting_eps(q, z, rounds, delta), rel=1e-6)
    # Opacus is a separate implementation of the same RDP bound (different orders): within a few percent
    assert ours == pytest.approx(_opacus_eps(q, z, rounds, delta), rel=0.05)


@pytest.mark.parametrize(("q", "z", "rounds", "delta"), [(0.1, 1.0, 20, 1e-5)])
def test_pld_is_tighter_than_rdp_and_matches_dp_accounting(q: float, z: float, rounds: int, delta: float) -> None:
    ours = acc.epsilon([acc.poisson_entry(q, z, rounds)], delta, accountant="pld")
    direct = pld.PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert ours == pytest.approx(direct.get_epsilon(delta), rel=1e-6)
    assert ours < acc.epsilon([acc.poisson_entry(q, z, rounds)], delta)


def test_ledger_merges_and_composes_like_one_event() -> None:
    ledger: list = []
    for _ in range(7):
        ledger = acc.append(ledger, acc.poisson_entry(0.1, 1.0))
    assert ledger == [acc.poisson_entry(0.1, 1.0, 7)]
    ledger = acc.append(ledger, acc.poisson_entry(0.2, 1.0))
    assert len(ledger) == 2
    a = rdp.RdpAccountant()
    a.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 7)
    a.compose(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)), 1)
    assert acc.epsilon(ledger, 1e-5) == pytest.approx(a.get_epsilon(1e-5), rel=1e-6)
    assert acc.epsilon([], 1e-5) == 0.0


def test_fixed_size_sampling_uses_replace_one_with_doubled_sensitivity() -> None:
    ours = acc.epsilon([acc.fixed_entry(1000, 50, 1.0, 100)], 1e-5)
    a = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # replacing one client moves the clipped sum by up to 2C: the multiplier against that is z / 2
    a.compose(dp_accounting.SampledWithoutReplacementDpEvent(1000, 50, dp_accounting.GaussianDpEvent(0.5)), 100)
    assert ours == pytest.approx(a.get_epsilon(1e-5), rel=1e-6)
    with pytest.raises(ValueError, match="mix"):
        acc.epsilon([acc.fixed_entry(1000, 50, 1.0), acc.poisson_entry(0.05, 1.0)], 1e-5)


@pytest.mark.parametrize(("target", "q", "rounds"), [(1.0, 0.01, 500), (4.0, 0.1, 100)])
def test_noise_multiplier_for_target_epsilon_is_tight(target: float, q: float, rounds: int) -> None:
    z = acc.noise_multiplier_for_epsilon(target, 1e-5, rounds=rounds, q=q)
    assert _dp_accounting_eps(q, z, rounds, 1e-5) <= target
    # the oracle: dp-accounting's calibration with its default orders, solved 100x tighter than ours
    direct = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda z: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
        ),
        target,
        1e-5,
        tol=1e-9,
    )
    assert z == pytest.approx(direct, rel=1e-6)
    assert _dp_accounting_eps(q, z * (1 - 1e-5), rounds, 1e-5) > target  # not wastefully large


@pytest.mark.slow
def test_noise_multiplier_for_fixed_size_sampling() -> None:
    z = acc.noise_multiplier_for_epsilon(3.0, 1e-5, rounds=50, population=200, sample_size=20)
    eps = acc.epsilon([acc.fixed_entry(200, 20, z, 50)], 1e-5)
    assert eps <= 3.0 and eps == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(ValueError):
        acc.noise_multiplier_for_epsilon(3.0, 1e-5, rounds=50, q=0.1, population=200, sample_size=20)


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    eps = [acc.epsilon([acc.poisson_entry(0.1, 1.0, r)], 1e-5) for r in (1, 10, 100)]
    assert eps == sorted(eps) and eps[0] > 0
    assert acc.epsilon([acc.poisson_entry(0.1, 2.0, 10)], 1e-5) < eps[1]
