"""Bounded influence of one client, and the check that keeps a bad aggregate out of the global model.

Before an update reaches the strategy's fold, its example count is capped (``server.max_examples_per_client``:
a fixed number, or ``adaptive_examples_multiple`` times the median count of the previous round; and, where the
deployment lists them, the count each client declared at enrolment, ``deployment.declared_examples``: a
claim above it is capped or refused, ``deployment.over_declared``) and its L2
norm is bounded (``server.update_norm_bound``: a fixed number, or ``adaptive_norm_multiple`` times the median
update norm of the previous round). A client can then move the weighted mean by at most
(its capped weight / the total) x the bound, however large the numbers it sends.

After aggregation, ``rejection`` says why the new state must not become the global model: a value that is
not finite (an overflowing sum, an optimiser moment gone to Inf), or a step longer than ``max_step_ratio``
times max(1, |global|). The loop then keeps the model as it was and logs the round as failed.

Norms are accumulated in float64 block by block: no model-sized temporary, and no float32 overflow for a
finite update of 1e30s (whose float32 squared norm would read as Inf).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, replace

from fedtune.aggregation.clip import clip_l2
from fedtune.config.schema import Config
from fedtune.core.messages import HeldUpdate, Reply
from fedtune.core.params import all_finite, l2_norm
from fedtune.core.state import ServerState
from fedtune.errors import UpdateRejected

MEDIAN_KEY = "update_norm_median"  # ServerState.extra: the previous round's median update norm (adaptive)
EXAMPLES_KEY = "num_examples_median"  # ServerState.extra: the previous round's median example count (adaptive)


@dataclass(frozen=True)
class Bounds:
    """What one client's update may weigh: built from ``config.server`` and the state before the round."""

    max_examples: int | None
    norm_bound: float | None  # the L2 bound this round (None: not clipped)
    measure: bool  # record update norms (the adaptive bound needs this round's median for the next)
    declared: Mapping[str, int] | None = None  # deployment.declared_examples: each client's most examples
    refuse_over: bool = False  # a claim above the declared count is refused (else weighted by the declared)

    @classmethod
    def for_round(cls, config: Config, state: ServerState) -> Bounds:
        srv = config.server
        mode = srv.update_norm_bound
        bound: float | None = None
        if isinstance(mode, int | float):
            bound = float(mode)
        elif mode == "adaptive" and state.extra.get(MEDIAN_KEY):
            bound = srv.adaptive_norm_multiple * float(state.extra[MEDIAN_KEY])
        cap_mode, cap = srv.max_examples_per_client, None
        if isinstance(cap_mode, int):
            cap = cap_mode
        elif cap_mode == "adaptive" and state.extra.get(EXAMPLES_KEY):
            cap = max(1, math.floor(srv.adaptive_examples_multiple * float(state.extra[EXAMPLES_KEY])))
        dep = config.deployment
        return cls(
            cap,
            bound,
            measure=mode not in ("off", "auto"),
            declared=dep.declared_examples,
            refuse_over=dep.over_declared == "refuse",
        )

    def admit(self, update: Reply) -> None:
        """Raise UpdateRejected when the update's example count breaks what its client declared at enrolment:
        none declared, or more than declared with ``over_declared: refuse``."""
        if self.declared is None:
            return
        most = self.declared.get(update.client_id)
        if most is None:
            raise UpdateRejected(f"client {update.client_id!r} declared no example count at enrolment")
        if self.refuse_over and update.num_examples > most:
            raise UpdateRejected(
                f"claims {update.num_examples} training examples, more than the {most} declared at enrolment"
            )

    def apply(self, update: Reply) -> tuple[Reply, dict]:
        """(the update as it is folded, what was changed: for the client's metrics line). Never mutates. A
        HeldUpdate has only its example count capped: its norm is bounded inside SecAgg (clip_range)."""
        info: dict = {}
        n = update.num_examples
        most = self.declared.get(update.client_id) if self.declared is not None else None
        if most is not None and n > most:
            logging.getLogger("fedtune").warning(
                "round %d: client %s claims %d training examples, more than the %d declared at enrolment: "
                "weighted as %d",
                update.round, update.client_id, n, most, most,
            )  # fmt: skip
            info["examples_declared"] = most
            n = most
        if self.max_examples is not None and n > self.max_examples:
            n = self.max_examples
        if n != update.num_examples:
            info["examples_capped_from"] = update.num_examples
        if isinstance(update, HeldUpdate):
            return (update if n == update.num_examples else replace(update, num_examples=n)), info
        delta = update.delta
        if self.measure or self.norm_bound is not None:
            norm = l2_norm(delta)
            info["update_norm"] = norm
            if self.norm_bound is not None and norm > self.norm_bound:
                delta, _ = clip_l2(delta, self.norm_bound, norm=norm)
                info["update_clipped"] = 1
        if n == update.num_examples and delta is update.delta:
            return update, info
        return replace(update, num_examples=n, delta=delta), info


def with_round_median(config: Config, state: ServerState, norms: list[float], counts: list[int]) -> ServerState:
    """The adaptive bounds' memory: this round's median update norm and declared example count, kept in the
    state (so resume is exact). A round without updates keeps the previous medians."""
    extra = dict(state.extra)
    if config.server.update_norm_bound == "adaptive" and norms:
        extra[MEDIAN_KEY] = float(statistics.median(norms))
    if config.server.max_examples_per_client == "adaptive" and counts:
        extra[EXAMPLES_KEY] = float(statistics.median(counts))
    return state if extra == state.extra else state.evolve(extra=extra)


def rejection(config: Config, old: ServerState, new: ServerState) -> str | None:
    """Why ``new`` must not become the global model (None: it may)."""
    if not all_finite(new.params):
        return "the aggregated model is not finite (NaN or Inf): an update overflowed the sum"
    for name, arr in new.arrays.items():
        if arr.dtype.kind == "f" and not all_finite(arr.reshape(-1)):
            return f"server state array {name!r} is not finite after aggregation"
    step = l2_norm(new.params, old.params) if new.params is not old.params else 0.0
    if not math.isfinite(step):
        return "the aggregated step's norm is not finite"
    limit = config.server.max_step_ratio * max(1.0, l2_norm(old.params))
    if step > limit:
        return (
            f"the aggregated step has norm {step:.3g}, more than server.max_step_ratio="
            f"{config.server.max_step_ratio:g} x max(1, |global model|) = {limit:.3g}"
        )
    return None
