"""Aggregation rules for untrusted clients, and the plain weighted mean, behind one small fold interface.

An aggregator turns the round's client deltas into one delta. ``mean`` and ``norm_bounded_mean`` stream
(one model-sized accumulator however many clients reply); ``median``, ``trimmed_mean``, ``krum`` and
``multi_krum`` need every update at once and keep a (K, d) float32 stack for the round.

Robust rules ignore the client weights except where noted: a client that lies about its update can lie
about its example count too, so weighting by n_k would hand it the aggregate.

    median            coordinate-wise median (Yin et al. 2018)
    trimmed_mean      per coordinate, drop the floor(beta K) largest and smallest values, mean the rest
                      (Yin et al. 2018); tolerates fewer than beta K attackers
    krum              the update with the smallest sum of squared distances to its K - f - 2 nearest
                      neighbours (Blanchard et al. 2017); needs K > 2f + 2
    multi_krum        the weighted mean of the m best-scored updates under the same score
    norm_bounded_mean clip every update to L2 norm <= M, then the weighted mean (Sun et al. 2019)

Every function here is pure: inputs are never modified and results are new float32 arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedtune.aggregation.clip import clip_l2
from fedtune.aggregation.fedavg import WeightedMean

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bounded_mean")


# --------------------------------------------------------------------------------------------- pure math


def _stack(deltas: Sequence[np.ndarray]) -> np.ndarray:
    if not deltas:
        raise ValueError("no updates to aggregate")
    return np.stack([np.asarray(d, dtype=np.float32) for d in deltas])  # (K, d), a copy


def coordinate_median(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median of K vectors.

    >>> coordinate_median([np.array([1, 10], np.float32), np.array([2, -5], np.float32),
    ...                    np.array([100, 0], np.float32)]).tolist()
    [2.0, 0.0]
    """
    return np.median(_stack(deltas).astype(np.float64), axis=0).astype(np.float32)


def trimmed_mean(deltas: Sequence[np.ndarray], trim_fraction: float) -> np.ndarray:
    """Per coordinate, the mean after dropping the k = floor(trim_fraction * K) largest and smallest values."""
    stack = _stack(deltas)
    n = stack.shape[0]
    k = int(np.floor(trim_fraction * n + 1e-9))
    if not 0 <= trim_fraction < 0.5 or n - 2 * k < 1:
        raise ValueError(f"trim_fraction {trim_fraction} leaves no value of {n} to average")
    ordered = np.sort(stack, axis=0)  # (K, d), sorted per coordinate
    return ordered[k : n - k].astype(np.float64).mean(axis=0).astype(np.float32)


def pairwise_sq_distances(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """(K, K) float64 matrix of squared L2 distances, from differences (no |a|^2+|b|^2-2ab cancellation)."""
    stack = _stack(deltas)
    n = stack.shape[0]
    dist = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            diff = stack[i].astype(np.float64) - stack[j]
            dist[i, j] = dist[j, i] = float(diff @ diff)
    return dist


def krum_scores(deltas: Sequence[np.ndarray], num_byzantine: int) -> np.ndarray:
    """Blanchard et al. 2017: score_i = sum of squared distances to the K - f - 2 closest other updates."""
    n = len(deltas)
    if n <= 2 * num_byzantine + 2:
        raise ValueError(f"Krum needs more than 2f + 2 = {2 * num_byzantine + 2} updates, got {n}")
    dist = pairwise_sq_distances(deltas)
    neighbours = n - num_byzantine - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


def krum_select(deltas: Sequence[np.ndarray], num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` best (lowest) Krum scores, best first; ties go to the lower index."""
    scores = krum_scores(deltas, num_byzantine)
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_selected]]


# --------------------------------------------------------------------------------------------- folds


class Fold(Protocol):
    def add(self, delta: np.ndarray, weight: float) -> None: ...

    def result(self) -> tuple[np.ndarray, dict]:
        """(aggregated delta, metrics)."""
        ...

    @property
    def count(self) -> int: ...


class Aggregator(Protocol):
    name: str
    streaming: bool  # False: keeps every update of the round in memory
    linear: bool  # True: the result depends on the updates only through their weighted sum

    def fold(self, numel: int) -> Fold: ...


@dataclass
class _MeanFold:
    numel: int
    bound: float | None = None
    clipped: int = 0
    _mean: WeightedMean = field(init=False)

    def __post_init__(self) -> None:
        self._mean = WeightedMean(self.numel)

    @property
    def count(self) -> int:
        return self._mean.count

    def add(self, delta: np.ndarray, weight: float) -> None:
        if self.bound is not None:
            delta, norm = clip_l2(delta, self.bound)
            self.clipped += int(norm > self.bound)
        self._mean.add(delta, weight)

    def result(self) -> tuple[np.ndarray, dict]:
        metrics = {"clipped": self.clipped} if self.bound is not None else {}
        return self._mean.result(), metrics


@dataclass
class _StackFold:
    numel: int
    rule: RobustRule
    deltas: list[np.ndarray] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.deltas)

    def add(self, delta: np.ndarray, weight: float) -> None:
        if delta.shape != (self.numel,):
            raise ValueError(f"update has shape {delta.shape}, expected ({self.numel},)")
        self.deltas.append(delta)  # kept by reference and never written to
        self.weights.append(float(weight))

    def result(self) -> tuple[np.ndarray, dict]:
        if not self.deltas:
            raise ValueError("no updates were folded")
        return self.rule.combine(self.deltas, self.weights)


@dataclass(frozen=True)
class Mean:
    """The weighted mean (FedAvg's rule), streamed."""

    name: str = "mean"
    streaming: bool = True
    linear: bool = True

    def fold(self, numel: int) -> Fold:
        return _MeanFold(numel)


@dataclass(frozen=True)
class NormBoundedMean:
    """Clip each update to L2 norm <= bound, then the weighted mean, streamed."""

    bound: float
    name: str = "norm_bounded_mean"
    streaming: bool = True
    linear: bool = False  # each update is clipped by its own norm

    def fold(self, numel: int) -> Fold:
        return _MeanFold(numel, bound=self.bound)


@dataclass(frozen=True)
class RobustRule:
    """median / trimmed_mean / krum / multi_krum over the whole round's updates."""

    name: str
    trim_fraction: float = 0.1
    num_byzantine: int = 0  # f, the number of attackers Krum must tolerate
    num_selected: int | None = None  # multi_krum's m (default K - f)
    streaming: bool = False
    linear: bool = False

    def fold(self, numel: int) -> Fold:
        return _StackFold(numel, self)

    def combine(self, deltas: Sequence[np.ndarray], weights: Sequence[float]) -> tuple[np.ndarray, dict]:
        if self.name == "median":
            return coordinate_median(deltas), {}
        if self.name == "trimmed_mean":
            return trimmed_mean(deltas, self.trim_fraction), {}
        m = 1 if self.name == "krum" else (self.num_selected or len(deltas) - self.num_byzantine)
        chosen = krum_select(deltas, self.num_byzantine, min(m, len(deltas)))
        mean = WeightedMean(deltas[0].size)
        for i in chosen:
            mean.add(deltas[i], weights[i])
        return mean.result(), {"selected": len(chosen), "rejected": len(deltas) - len(chosen)}


def make_aggregator(
    name: str,
    *,
    trim_fraction: float = 0.1,
    num_byzantine: int = 0,
    num_selected: int | None = None,
    norm_bound: float | None = None,
) -> Aggregator:
    """The registry: a validated name to an aggregator object."""
    if name == "mean":
        return Mean()
    if name == "norm_bounded_mean":
        if norm_bound is None or not norm_bound > 0:
            raise ValueError("norm_bounded_mean needs a positive norm bound")
        return NormBoundedMean(norm_bound)
    if name in ("median", "trimmed_mean", "krum", "multi_krum"):
        return RobustRule(name, trim_fraction=trim_fraction, num_byzantine=num_byzantine, num_selected=num_selected)
    raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
