"""The round contract between the loop and a strategy: one typed protocol, every method always present.

A strategy is a set of state transitions over ``ServerState``; it keeps nothing on ``self`` that changes
between rounds, so a checkpoint of the state is enough to resume. The loop (``fedtune.server.loop``) calls,
once per round and in this order::

    state = strategy.begin_round(state, population=N)     # e.g. DP records N, calibrates its noise
    reason = strategy.should_stop(state)                  # e.g. the privacy budget is spent: stop before
    arrays, options = strategy.fit_payload(state, cid)    # per sampled client, sent with the global vector
    plan = strategy.sum_plan(state)
    if plan is None:                                      # the strategy reads every update (FedOpt's fold)
        state, metrics = strategy.aggregate(state, updates)
    else:                                                 # it needs only a sum: the LOOP forms it, in the
        total = summer(updates, plan)                     # clear or by secure aggregation (the transport's
        state, metrics = strategy.apply_sum(state, total) # capability), and hands the strategy the result
    extras = strategy.eval_payload(state, client_id=cid)  # what evaluating the global model needs

and, when a client's fit or evaluation fails with cause STATE_LOST (it lacks client state the strategy
assumed it keeps, e.g. its copy of the LoRA residual), ``state = strategy.client_state_lost(state, cid)``:
the loop asks that client once more, in the same round, with the payload of that state.

``needs`` declares what the strategy needs from its clients (individual updates or only their sum, and
which update extras), composed from what each of its parts declares; the privacy layer reads it instead of
guessing from names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedtune.core.messages import ClientUpdate
from fedtune.core.params import ParamSpec
from fedtune.core.state import ServerState
from fedtune.core.sums import LinearSum, SumPlan

Payload = tuple[dict[str, np.ndarray], dict[str, Any]]  # (arrays, scalar options) for one client
Outcome = tuple[ServerState, dict]  # (the new state, the round's aggregate metrics)


@dataclass(frozen=True)
class Needs:
    """What a strategy, or one part of it, needs from the clients' replies.

    ``individual`` names the parts that read each update (a robust rule, SCAFFOLD's controls, LoRA factors):
    empty means the part is linear, i.e. its aggregate depends on the updates only through their weighted
    sum, which is all DP-FedAvg or secure aggregation lets the server see. ``extras`` are the update extras
    the aggregation reads (SCAFFOLD's control delta).

    >>> (Needs() + Needs(individual=("the 'scaffold' plug-in",), extras=("scaffold/dc",))).linear
    False
    """

    individual: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()

    @property
    def linear(self) -> bool:
        return not self.individual

    def __add__(self, other: Needs) -> Needs:
        return Needs(self.individual + other.individual, self.extras + other.extras)


LINEAR = Needs()


class Strategy(Protocol):
    """The server side of a round; see the module docstring for when the loop calls each method."""

    @property
    def needs(self) -> Needs: ...

    def init_state(self, params: np.ndarray, spec: ParamSpec) -> ServerState:
        """Round 0: the initial vector (copied) and every array the strategy keeps (optimiser moments, ...)."""
        ...

    def begin_round(self, state: ServerState, *, population: int) -> ServerState:
        """Once before each round, with the size of the population the round samples from."""
        ...

    def should_stop(self, state: ServerState) -> str | None:
        """A reason to stop before the round ``begin_round`` opened (None: go on)."""
        ...

    def fit_payload(self, state: ServerState, client_id: str) -> Payload:
        """(arrays, scalar options) sent to one sampled client alongside the global vector."""
        ...

    def eval_payload(self, state: ServerState, *, client_id: str | None = None) -> dict[str, np.ndarray]:
        """Arrays that, with ``state.params``, make up the global model (EvalInstruction.extras); often none.
        With ``client_id``: what that client needs to make it, which may be less (it may hold part already)."""
        ...

    def client_state_lost(self, state: ServerState, client_id: str) -> ServerState:
        """The client lost what the strategy assumed it keeps between rounds (a failure of cause STATE_LOST):
        the state whose payloads send it that again (LoRA: forget the residual version it holds, so it gets
        the dense residual). Unchanged when the strategy assumes nothing of its clients."""
        ...

    def sum_plan(self, state: ServerState) -> SumPlan | None:
        """None: ``aggregate`` folds the updates itself. A plan: the loop forms that sum and calls ``apply_sum``."""
        ...

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> Outcome:
        """The round's transition from the accepted updates, folded one at a time (they may not all fit in
        memory). A strategy with a sum plan folds them into that sum in the clear (the loop instead forms the
        sum, securely when configured)."""
        ...

    def apply_sum(self, state: ServerState, total: LinearSum) -> Outcome:
        """The round's transition from the sum of its plan (``total.aborted``: it could not be formed)."""
        ...
