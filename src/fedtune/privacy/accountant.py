"""Privacy accounting on top of Google's dp-accounting (RDP or PLD); no hand-rolled privacy math.

The ledger is a JSON-able list of ``{"sampling", "q" | "n"/"m", "z", "count"}`` entries kept in
ServerState.extra, so it survives a checkpoint; ``epsilon(ledger, delta)`` rebuilds a fresh accountant
from it every time (pure, and cheap for RDP).

Sampling and adjacency:

* ``poisson``: each client (or example) joins with probability q; add-or-remove-one adjacency;
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
* ``fixed``: exactly m of n, without replacement; replace-one adjacency (n is public). Replacing one
  client moves the clipped sum by up to 2C, so the Gaussian's multiplier relative to that sensitivity is
  z / 2: ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z / 2))`` (RDP only).
* ``gaussian_replace``: a Gaussian mechanism without amplification under replace-one adjacency (local
  DP-SGD over shuffled minibatches), again with multiplier z / 2.
* ``skellam``: distributed DP's Skellam mechanism (``{"l2", "l1", "mu"}``: sensitivities and noise variance
  in integer units), replace-one, no amplification; its RDP is fedtune.privacy.distributed.skellam_rdp.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld, rdp

NeighborRel = dp_accounting.NeighboringRelation
Entry = dict[str, Any]

# RDP is evaluated at dp-accounting's own default orders (rdp.RdpAccountant() without orders, 156 of them):
# epsilon is a minimum over the orders, so a coarser grid only ever over-reports it and makes calibration
# add more noise than needed. Calibration solves for z to CALIBRATION_TOL (absolute; relative 1e-6 for z >= 0.1).
CALIBRATION_TOL = 1e-7


def poisson_entry(q: float, z: float, count: int = 1) -> Entry:
    return {"sampling": "poisson", "q": float(q), "z": float(z), "count": int(count)}


def fixed_entry(n: int, m: int, z: float, count: int = 1) -> Entry:
    return {"sampling": "fixed", "n": int(n), "m": int(m), "z": float(z), "count": int(count)}


def gaussian_replace_entry(z: float, count: int = 1) -> Entry:
    return {"sampling": "gaussian_replace", "z": float(z), "count": int(count)}


def _key(entry: Entry) -> tuple:
    return tuple(sorted((k, v) for k, v in entry.items() if k != "count"))


def append(ledger: Sequence[Entry], entry: Entry) -> list[Entry]:
    """A new ledger with ``entry`` added (merged into the last entry when it is the same mechanism)."""
    out = [dict(e) for e in ledger]
    if out and _key(out[-1]) == _key(entry):
        out[-1]["count"] += entry["count"]
    else:
        out.append(dict(entry))
    return out


def _event(entry: Entry) -> dp_accounting.DpEvent:
    z, kind = entry["z"], entry["sampling"]
    if kind == "poisson":
        inner = dp_accounting.PoissonSampledDpEvent(entry["q"], dp_accounting.GaussianDpEvent(z))
    elif kind == "fixed":
        inner = dp_accounting.SampledWithoutReplacementDpEvent(
            entry["n"], entry["m"], dp_accounting.GaussianDpEvent(z / 2)
        )
    elif kind == "gaussian_replace":
        inner = dp_accounting.GaussianDpEvent(z / 2)
    else:
        raise ValueError(f"unknown ledger entry sampling {kind!r}")
    return dp_accounting.SelfComposedDpEvent(inner, entry["count"])


def _relation(ledger: Sequence[Entry]) -> NeighborRel:
    kinds = {e["sampling"] for e in ledger}
    if kinds <= {"poisson"}:
        return NeighborRel.ADD_OR_REMOVE_ONE
    if kinds <= {"fixed", "gaussian_replace"}:
        return NeighborRel.REPLACE_ONE
    raise ValueError(f"a ledger cannot mix add/remove and replace-one adjacency: {sorted(kinds)}")


def make_accountant(kind: str, relation: NeighborRel) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    if kind == "pld":
        if relation is not NeighborRel.ADD_OR_REMOVE_ONE:
            raise ValueError("the PLD accountant here only accounts Poisson sampling; use 'rdp'")
        return pld.PLDAccountant(neighboring_relation=relation)
    raise ValueError(f"unknown accountant {kind!r}")


def epsilon(ledger: Sequence[Entry], delta: float, *, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after every mechanism in the ledger (0 for an empty ledger).

    >>> round(epsilon([poisson_entry(0.1, 1.0, 100)], 1e-5), 2) > 0
    True
    """
    if not ledger:
        return 0.0
    kinds = {e["sampling"] for e in ledger}
    if "skellam" in kinds:  # distributed DP: Skellam RDP (fedtune.privacy.distributed), not a dp-accounting event
        if kinds != {"skellam"} or accountant != "rdp":
            raise ValueError("a ledger of Skellam (distributed DP) rounds is accounted alone, by RDP")
        from fedtune.privacy.distributed import epsilon as skellam_epsilon

        eps = skellam_epsilon(ledger, delta)
        return eps if math.isfinite(eps) else math.inf
    acc = make_accountant(accountant, _relation(ledger))
    with _quiet_absl():
        acc.compose(dp_accounting.ComposedDpEvent([_event(e) for e in ledger]))
        eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    *,
    rounds: int,
    q: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier z whose ``rounds`` rounds spend at most ``target_epsilon`` at ``delta``.

    Poisson sampling: give ``q``. Fixed-size sampling without replacement: give ``population`` and
    ``sample_size``. This is dp-accounting's calibrate_dp_mechanism (Brent search to CALIBRATION_TOL), which
    returns a z whose epsilon does not exceed the target.

    >>> z = noise_multiplier_for_epsilon(2.0, 1e-5, rounds=100, q=0.1)
    >>> bool(epsilon([poisson_entry(0.1, z, 100)], 1e-5) <= 2.0)
    True
    """
    if (q is None) == (population is None or sample_size is None):
        raise ValueError("give q (Poisson) or population and sample_size (fixed), not both")
    if rounds < 1 or not target_epsilon > 0:
        raise ValueError("rounds must be >= 1 and target_epsilon > 0")

    def entry(z: float) -> Entry:
        if q is not None:
            return poisson_entry(q, z, rounds)
        return fixed_entry(population, sample_size, z, rounds)  # type: ignore[arg-type]

    relation = _relation([entry(1.0)])
    with _quiet_absl():
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant, relation),
            lambda z: _event(entry(z)),
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-2, 1.0),
            tol=CALIBRATION_TOL,
        )
    z = float(z)
    if not epsilon([entry(z)], delta, accountant=accountant) <= target_epsilon:  # dp-accounting's contract
        raise ValueError("could not calibrate a noise multiplier for this target")
    return z


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """At some (q, z) the series for fractional RDP orders near 1 does not converge; dp-accounting drops
    those orders (correctly: epsilon stays a valid upper bound) and logs a warning for each, every round."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)
