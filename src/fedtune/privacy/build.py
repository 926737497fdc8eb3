"""Map the ``privacy`` config section onto the strategy wrappers and the client's hooks and transforms.

Called as the last step of ``build_strategy`` and ``build_client_extensions``, so privacy wraps whatever
strategy the rest of the config built (and refuses, with a ConfigError, one that is not linear).
"""

from __future__ import annotations

from fedtune.config.schema import Config
from fedtune.core.strategy import Strategy
from fedtune.privacy.wrapping import LinearStrategy


def wrap_strategy(strategy: LinearStrategy, config: Config) -> Strategy:
    """DP-FedAvg or secure aggregation around ``strategy``; the strategy itself when both are off. Either
    wrapper makes it a sum strategy: the loop forms the planned sum with ``summer_for``'s summer."""
    p = config.privacy
    if p.dp is not None:
        from fedtune.privacy.dp_fedavg import DPFedAvg

        dropout = p.secure_aggregation.expected_dropout if p.secure_aggregation else 0.0
        return DPFedAvg(strategy, p.dp, config.federation, seed=config.seed, expected_dropout=dropout)
    if p.secure_aggregation is not None:
        from fedtune.privacy.secagg.strategy import SecureAggregation

        return SecureAggregation(strategy, p.secure_aggregation, weighting=config.server.weighting)
    return strategy


def client_privacy(config: Config) -> tuple[list, list]:
    """(hook factories to run first, update transforms to run last) for the client."""
    p = config.privacy
    hook_factories: list = []
    transforms: list = []
    if p.dpsgd is not None:
        from fedtune.privacy.dpsgd import DpSgd

        dpsgd = DpSgd(p.dpsgd, state=config.simulation.client_state)  # the client ledgers: off-worker
        hook_factories.append(dpsgd.hooks)  # its hooks' finish books the round's cost on the client's ledger
    if p.dp is not None:
        from fedtune.privacy.client_clip import dp_clip_transform

        transforms.append(dp_clip_transform)  # last: what leaves the client is what is bounded
        if p.dp.distributed:
            from fedtune.privacy.ddp_client import DistributedNoise

            assert p.secure_aggregation is not None  # checked at load (check_distributed_dp)
            transforms.append(
                DistributedNoise(
                    p.dp,
                    rounds=config.federation.rounds,
                    clients_per_round=config.federation.clients_per_round,
                    expected_dropout=p.secure_aggregation.expected_dropout,
                )
            )
    return hook_factories, transforms
