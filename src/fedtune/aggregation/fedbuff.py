"""FedBuff's buffered step (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation").

Clients train on the model version they were dispatched with and arrive whenever they finish. The server
folds arrivals into a buffer and, after K of them, takes one step. An arrival trained on version v that
reaches a server at version t has staleness tau = t - v and is discounted by a staleness weight s(tau) <= 1.

    paper (Algorithm 1, uniform clients):   step = (1/K) sum_k s(tau_k) delta_k
    fedtune (example weights w_k = n_k):    step = sum_k s(tau_k) w_k delta_k / sum_k w_k

The normalisation is the paper's: the denominator does NOT include the staleness weights, so a buffer of stale
updates moves the model less (with uniform weights w_k = 1 the two lines are identical). Renormalising by
sum s_k w_k instead would only re-weight the buffer and undo the discount of a buffer that is stale as a whole.
``delta`` is local - global (the repository's convention); the server optimiser then treats ``step`` as the
pseudo-gradient exactly as in a synchronous round (``aggregation.server_opt``).

Staleness weights (tau >= 0):

    sqrt         s = 1 / sqrt(1 + tau)                           FedBuff's choice (the default)
    constant     s = 1                                           no discount
    polynomial   s = (1 + tau) ** -a                             FedAsync (Xie et al. 2019)
    hinge        s = 1 if tau <= b else 1 / (a (tau - b) + 1)    FedAsync's hinge

The fold is the one weighted fold of the repository (``aggregation.fedavg.WeightedSum``, float64 here, the
staleness weight a discount of the summand): what a synchronous round's sum uses, and what the loop forms for
a FedBuff step (``privacy.sums.plain_sum`` with ``SumPlan.staleness``). Nothing here mutates its inputs; the
fold accumulates in float64 in arrival order and rounds to float32 once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtune.aggregation.fedavg import WeightedSum

STALENESS_RULES = ("sqrt", "constant", "polynomial", "hinge")


@dataclass(frozen=True)
class StalenessWeight:
    """s(tau); ``a`` is the polynomial exponent or the hinge slope, ``b`` the hinge's free staleness.

    >>> StalenessWeight("sqrt")(3)
    0.5
    >>> StalenessWeight("hinge", a=1.0, b=2)(4)
    0.3333333333333333
    """

    rule: str = "sqrt"
    a: float = 0.5
    b: int = 4

    def __post_init__(self) -> None:
        if self.rule not in STALENESS_RULES:
            raise ValueError(f"unknown staleness rule {self.rule!r}; choose one of {', '.join(STALENESS_RULES)}")
        if not self.a > 0 or self.b < 0:
            raise ValueError(f"staleness needs a > 0 and b >= 0, got a={self.a}, b={self.b}")

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness cannot be negative, got {tau}")
        if self.rule == "sqrt":
            return 1.0 / math.sqrt(1.0 + tau)
        if self.rule == "constant":
            return 1.0
        if self.rule == "polynomial":
            return (1.0 + tau) ** -self.a
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


def buffered_step(
    arrivals: list[tuple[np.ndarray, float, int]], weight_rule: StalenessWeight, numel: int
) -> np.ndarray:
    """The step of a buffer given as (delta, example weight, staleness) triples, folded in the given order.

    >>> buffered_step([(np.array([2, 4], np.float32), 1.0, 0), (np.array([4, 0], np.float32), 3.0, 3)],
    ...               StalenessWeight("sqrt"), 2).tolist()
    [2.0, 1.0]
    """
    fold = WeightedSum(numel, dtype=np.float64)
    for delta, weight, tau in arrivals:
        fold.add(delta, weight, scale=weight_rule(tau))
    if fold.count == 0:
        raise ValueError("no updates were folded")
    return (fold.acc / fold.total_weight).astype(np.float32)
