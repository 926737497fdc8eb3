"""The one thing a linear strategy needs from its clients: a (weighted) sum, by plain fold or SecAgg.

DP-FedAvg and secure aggregation both reduce a round to ``LinearSum``; how the sum is formed is a
``Summer``: ``plain_sum`` folds updates one at a time (and re-clips them on the server), the secure
summer in ``fedtune.privacy.secagg.driver`` runs the SecAgg protocol and sees only masked vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from fedtune.aggregation.clip import clip_l2
from fedtune.aggregation.fedavg import WeightedSum, client_weight
from fedtune.core.messages import ClientUpdate, HeldUpdate, Reply
from fedtune.core.sums import LinearSum, SumPlan
from fedtune.privacy.errors import PrivacyError

# an update may come back a rounding error above C after a float32 round trip; beyond this it was not
# clipped by the client and the server clips it (and counts it)
RECLIP_TOLERANCE = 1e-5


Summer = Callable[[Iterable[Reply], SumPlan], LinearSum]  # Reply: a ClientUpdate, or a HeldUpdate under SecAgg


def channel_value(update: ClientUpdate, name: str) -> float:
    """A per-client scalar channel, checked to lie in [0, 1] (it is a bit or a weight)."""
    if name not in update.extras:
        raise ValueError(f"client {update.client_id} did not send {name!r}")
    arr = np.asarray(update.extras[name], dtype=np.float64).reshape(-1)
    if arr.size != 1 or not 0.0 <= float(arr[0]) <= 1.0:
        raise ValueError(f"client {update.client_id} sent {name!r} outside [0, 1]")
    return float(arr[0])


def plain_sum(updates: Iterable[Reply], plan: SumPlan) -> LinearSum:
    """Fold the updates into one float64 accumulator; never mutates them. Each summand is clipped to the
    plan's L2 bound, then discounted by its staleness (async mode), then weighted."""
    folded = WeightedSum(plan.numel, dtype=np.float64)
    reclipped, rejected = 0, 0
    channels = dict.fromkeys(plan.channels, 0.0)
    for update in updates:
        if isinstance(update, HeldUpdate):  # its client keeps it: only SecAgg can sum it
            raise PrivacyError(f"client {update.client_id} keeps its update, but the sum is formed in the clear")
        try:
            values = {name: channel_value(update, name) for name in plan.channels}
        except ValueError:
            rejected += 1  # a DP summand without its clipping bit cannot be accounted: leave it out
            continue
        delta = update.delta
        if plan.l2_bound is not None:
            delta, norm = clip_l2(delta, plan.l2_bound)
            reclipped += int(norm > plan.l2_bound * (1 + RECLIP_TOLERANCE))
        discount = 1.0 if plan.staleness is None else plan.staleness.of(update.client_id, update.version)
        folded.add(delta, client_weight(update.num_examples, plan.weighting), scale=discount)
        for name, value in values.items():
            channels[name] += value
    metrics = {"dp_server_reclipped": reclipped} if plan.l2_bound is not None else {}
    if rejected:
        metrics["rejected_no_channel"] = rejected
    return LinearSum(folded.acc, folded.total_weight, folded.count, channels=channels, metrics=metrics)
