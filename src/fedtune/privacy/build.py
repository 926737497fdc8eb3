"""Map the ``privacy`` config section onto the strategy wrappers and the client's hooks and transforms.

Called as the last step of ``build_strategy`` and ``build_client_extensions``, so privacy wraps whatever
strategy the rest of the config built (and refuses, with a ConfigError, one that is not linear).
"""

from __future__ import annotations

from typing import Any

from fedtune.config.schema import Config


def wrap_strategy(strategy: Any, config: Config) -> Any:
    """DP-FedAvg and/or secure aggregation around ``strategy``; the strategy itself when privacy is off."""
    p = config.privacy
    if p.dp is None and p.secure_aggregation is None:
        return strategy
    from fedtune.privacy.dp_fedavg import DPFedAvg
    from fedtune.privacy.secagg.driver import SecureSummer
    from fedtune.privacy.secagg.strategy import SecureAggregation
    from fedtune.privacy.sums import plain_sum

    summer = SecureSummer(p.secure_aggregation, seed=config.seed) if p.secure_aggregation else plain_sum
    if p.dp is not None:
        return DPFedAvg(strategy, p.dp, config.federation, seed=config.seed, summer=summer)
    assert p.secure_aggregation is not None
    return SecureAggregation(strategy, p.secure_aggregation, weighting=config.server.weighting, summer=summer)


def client_privacy(config: Config) -> tuple[list, list]:
    """(hook factories to run first, update transforms to run last) for the client."""
    p = config.privacy
    hook_factories: list = []
    transforms: list = []
    if p.dpsgd is not None:
        from fedtune.privacy.dpsgd import DpSgd

        dpsgd = DpSgd(p.dpsgd)
        hook_factories.append(dpsgd.hooks)
        transforms.append(dpsgd.transform)
    if p.dp is not None:
        from fedtune.privacy.client_clip import dp_clip_transform

        transforms.append(dp_clip_transform)  # last: what leaves the client is what is bounded
    return hook_factories, transforms


SIMULATION_TRANSPORTS = ("InProcessTransport", "RayTransport")


def check_secagg_transport(config: Config, transport: Any) -> None:
    """Refuse SecAgg over a transport that would hand the server plaintext updates.

    In the simulation the SecAgg driver runs the protocol between per-client objects in this process.
    Over the network the four message rounds must be carried by the transport (docs/PRIVACY.md lists
    them); until they are, running the driver on the server would mean receiving plaintext updates.
    """
    if config.privacy.secure_aggregation is None:
        return
    if type(transport).__name__ not in SIMULATION_TRANSPORTS:
        from fedtune.errors import ConfigError

        raise ConfigError(
            "privacy.secure_aggregation runs only in the simulation for now: over this transport "
            f"({type(transport).__name__}) the server would receive plaintext updates. The networked "
            "deployment must carry SecAgg's four message rounds first (docs/PRIVACY.md)"
        )
