"""The one thing a linear strategy needs from its clients: a (weighted) sum, by plain fold or SecAgg.

DP-FedAvg and secure aggregation both reduce a round to ``LinearSum``; how the sum is formed is a
``Summer``: ``plain_sum`` folds updates one at a time (and re-clips them on the server), the secure
summer in ``fedtune.privacy.secagg.driver`` runs the SecAgg protocol and sees only masked vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedtune.core.messages import ClientUpdate
from fedtune.privacy.clipping import clip_l2

# an update may come back a rounding error above C after a float32 round trip; beyond this it was not
# clipped by the client and the server clips it (and counts it)
RECLIP_TOLERANCE = 1e-5


@dataclass(frozen=True)
class SumPlan:
    """What to sum in one round, and under which bounds."""

    round: int
    numel: int
    weighting: str = "uniform"  # "uniform": w_k = 1; "examples": w_k from the client's example count
    l2_bound: float | None = None  # DP's C: every summand has L2 norm <= C (enforced)
    coord_bound: float = 1.0  # SecAgg quantisation range [-b, b] per coordinate (C under DP)
    channels: tuple[str, ...] = ()  # per-client scalars in [0, 1], read from update.extras, summed too
    weight_cap: int = 1000  # SecAgg example weighting: w_k = min(n_k, cap) / cap
    # distributed DP: the clients send noised integers (fedtune.privacy.distributed), decoded with this plan
    integers: Any = None  # a distributed.SkellamPlan, or None


@dataclass(frozen=True)
class LinearSum:
    total: np.ndarray  # float64, sum_k w_k x_k
    weight: float  # sum_k w_k
    count: int  # clients in the sum
    channels: dict[str, float] = field(default_factory=dict)  # sum_k of each channel
    metrics: dict[str, Any] = field(default_factory=dict)  # how the sum was formed (re-clips, SecAgg stats)


Summer = Callable[[Iterable[ClientUpdate], SumPlan], LinearSum]


def channel_value(update: ClientUpdate, name: str) -> float:
    """A per-client scalar channel, checked to lie in [0, 1] (it is a bit or a weight)."""
    if name not in update.extras:
        raise ValueError(f"client {update.client_id} did not send {name!r}")
    arr = np.asarray(update.extras[name], dtype=np.float64).reshape(-1)
    if arr.size != 1 or not 0.0 <= float(arr[0]) <= 1.0:
        raise ValueError(f"client {update.client_id} sent {name!r} outside [0, 1]")
    return float(arr[0])


def plain_sum(updates: Iterable[ClientUpdate], plan: SumPlan) -> LinearSum:
    """Fold the updates into one float64 accumulator; never mutates them."""
    acc = np.zeros(plan.numel, dtype=np.float64)
    weight, count, reclipped, rejected = 0.0, 0, 0, 0
    channels = dict.fromkeys(plan.channels, 0.0)
    for update in updates:
        try:
            values = {name: channel_value(update, name) for name in plan.channels}
        except ValueError:
            rejected += 1  # a DP summand without its clipping bit cannot be accounted: leave it out
            continue
        delta = update.delta
        if plan.l2_bound is not None:
            delta, norm = clip_l2(delta, plan.l2_bound)
            reclipped += int(norm > plan.l2_bound * (1 + RECLIP_TOLERANCE))
        w = float(update.num_examples) if plan.weighting == "examples" else 1.0
        torch.from_numpy(acc).add_(torch.from_numpy(delta), alpha=w)
        weight += w
        count += 1
        for name, value in values.items():
            channels[name] += value
    metrics = {"dp_server_reclipped": reclipped} if plan.l2_bound is not None else {}
    if rejected:
        metrics["rejected_no_channel"] = rejected
    return LinearSum(total=acc, weight=weight, count=count, channels=channels, metrics=metrics)
