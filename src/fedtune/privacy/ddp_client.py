"""Distributed DP's two config-side pieces: the Skellam plan both sides derive from their own config, and
the client's update transform that turns its clipped update into a noised integer vector for SecAgg.

The client never takes its noise level from the server: it computes the plan from its own copy of the
config (clip, noise multiplier or target epsilon, clients per round, expected dropout) and the length of
its update, exactly as the server does, so a server that asked for less noise would simply decode garbage.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np

from fedtune.config.privacy import DPConfig
from fedtune.core.messages import ClientUpdate, FitInstruction
from fedtune.privacy import distributed
from fedtune.privacy.errors import PrivacyError

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
        return replace(update, delta=np.zeros_like(update.delta), extras=extras)
