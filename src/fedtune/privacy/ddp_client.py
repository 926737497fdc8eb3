"""Distributed DP's two config-side pieces: the Skellam plan both sides derive from their own config, and
the client's update transform that turns its clipped update into a noised integer vector for SecAgg.

The client never takes its noise level from the server: it computes the plan from its own copy of the
config (clip, noise multiplier or target epsilon, clients per round, expected dropout) and the length of
its update, exactly as the server does, so a server that asked for less noise would simply decode garbage.

What the client cannot check is that the other clients add their shares: the run's epsilon assumes they do.
So the participant logs its own worst case, the epsilon its updates would cost with its share alone (the
sum's noise is then Sk(mu_l) instead of Sk(m mu_l)): once for the whole run, as a warning, and after every
round it trains, as the running figure.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

import numpy as np

from fedtune.config.privacy import DPConfig
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.privacy import distributed
from fedtune.privacy.errors import PrivacyError

log = logging.getLogger("fedtune.privacy")
DDP_KEY = "ddp_integers"  # update.extras: the client's noised integer vector (int64), SecAgg's input


@functools.lru_cache(maxsize=16)
def _plan(
    clip: float,
    z: float | None,
    target: float | None,
    delta: float,
    rounds: int,
    dim: int,
    clients: int,
    dropout: float,
) -> distributed.SkellamPlan:
    if z is None:
        assert target is not None
        z = distributed.noise_multiplier_for_epsilon(
            target, delta, rounds=rounds, clip=clip, dim=dim, clients_per_round=clients, expected_dropout=dropout
        )
    return distributed.plan_for(
        clip=clip, noise_multiplier=z, dim=dim, clients_per_round=clients, expected_dropout=dropout
    )


def config_plan(
    dp: DPConfig, *, rounds: int, clients_per_round: int | None, expected_dropout: float, dim: int
) -> distributed.SkellamPlan:
    """The Skellam plan of a distributed-DP run for an update of ``dim`` values (cached)."""
    if clients_per_round is None:
        raise PrivacyError("privacy.dp.distributed needs federation.clients_per_round")
    return _plan(
        dp.clip, dp.noise_multiplier, dp.target_epsilon, dp.delta, rounds, dim, clients_per_round, expected_dropout
    )


class DistributedNoise:
    """The client's last update transform under distributed DP: clip to its own C, scale, round at random
    and add its Skellam share from a private seed. The float update is replaced by zeros: only the noised
    integers (SecAgg's input, update.extras[DDP_KEY]) carry the client's contribution."""

    def __init__(self, dp: DPConfig, *, rounds: int, clients_per_round: int | None, expected_dropout: float) -> None:
        self.dp, self.rounds, self.clients, self.dropout = dp, rounds, clients_per_round, expected_dropout
        self.noised: dict[str, set[int]] = {}  # client -> the rounds whose updates this process noised

    def __call__(self, update: ClientUpdate, instr: FitInstruction) -> ClientUpdate:
        plan = config_plan(
            self.dp,
            rounds=self.rounds,
            clients_per_round=self.clients,
            expected_dropout=self.dropout,
            dim=update.delta.shape[0],
        )
        try:
            noised = distributed.encode(update.delta, plan, distributed.private_rng())
        except ValueError as err:
            raise PrivacyError(f"distributed DP: client {update.client_id}: {err}") from None
        extras = {**update.extras, DDP_KEY: noised}
        self._log_worst_case(update.client_id, instr.round, plan)
        return replace(update, delta=np.zeros_like(update.delta), extras=extras)

    def _log_worst_case(self, client_id: str, round_idx: int, plan: distributed.SkellamPlan) -> None:
        """The client's epsilon if the other clients' noise shares were missing (module docstring)."""
        first = not self.noised
        rounds = self.noised.setdefault(client_id, set())
        rounds.add(round_idx)  # a fit of the same round sent again costs nothing more: one of them is summed
        delta = self.dp.delta
        if first:
            planned = worst_case_epsilon(plan, shares=plan.planned_clients, rounds=self.rounds, delta=delta)
            log.warning(
                "distributed DP: this client adds 1/%d of the noise; if the other clients' noise shares were "
                "missing, its %d rounds would cost epsilon %.4g at delta %g (%.4g with the %d planned shares)",
                plan.planned_clients, self.rounds, worst_case_epsilon(plan, shares=1, rounds=self.rounds, delta=delta),
                delta, planned, plan.planned_clients,
            )  # fmt: skip
        alone = worst_case_epsilon(plan, shares=1, rounds=len(rounds), delta=delta)
        log.info(
            "distributed DP: client %s after round %d: epsilon <= %.4g at delta %g over its %d noised rounds if the "
            "other clients' noise shares were missing",
            client_id, round_idx, alone, delta, len(rounds),
        )  # fmt: skip


def worst_case_epsilon(plan: distributed.SkellamPlan, *, shares: int, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` rounds whose sum carries ``shares`` clients' noise (1: this one's alone)."""
    return distributed.epsilon([distributed.entry(plan, shares, rounds)], delta)
