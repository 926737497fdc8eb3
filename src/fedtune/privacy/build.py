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

    summer = (
        SecureSummer(p.secure_aggregation, seed=config.seed, ca_path=config.deployment.tls_ca)
        if p.secure_aggregation
        else plain_sum
    )
    if p.dp is not None:
        dropout = p.secure_aggregation.expected_dropout if p.secure_aggregation else 0.0
        return DPFedAvg(strategy, p.dp, config.federation, seed=config.seed, summer=summer, expected_dropout=dropout)
    assert p.secure_aggregation is not None
    return SecureAggregation(strategy, p.secure_aggregation, weighting=config.server.weighting, summer=summer)


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


SIMULATION_TRANSPORTS = ("InProcessTransport", "RayTransport")


def check_secagg_transport(config: Config, transport: Any) -> None:
    """Refuse SecAgg where it cannot keep its promise, with a ConfigError naming the problem.

    In the simulation the clients' protocol objects run in this process (the in-process driver). A
    networked transport must carry the five message rounds itself (``secagg_exchange``, the
    SecAggNetwork seam) and have been started for it, so that updates stay on the clients; otherwise the
    server would receive plaintext updates. Over the network, update compression is refused: the client
    sends only its masked vector (uniform in Z_R, incompressible), so a codec would silently not apply;
    and simulated dropouts are refused: dropouts there are real.
    """
    secagg = config.privacy.secure_aggregation
    if secagg is None or type(transport).__name__ in SIMULATION_TRANSPORTS:
        return
    from fedtune.errors import ConfigError

    if not callable(getattr(transport, "secagg_exchange", None)) or not getattr(transport, "secure_aggregation", False):
        raise ConfigError(
            f"privacy.secure_aggregation cannot run over this transport ({type(transport).__name__}): it does not "
            "carry SecAgg's message rounds, so the server would receive plaintext updates (docs/PRIVACY.md)"
        )
    if config.deployment.codec != "none":
        raise ConfigError(
            f"deployment.codec={config.deployment.codec!r} with privacy.secure_aggregation: under SecAgg a client "
            "sends only its masked vector, which cannot be compressed (set deployment.codec: none; "
            "privacy.secure_aggregation.value_bits shrinks the upload instead)"
        )
    if secagg.simulate_dropout > 0:
        raise ConfigError(
            "privacy.secure_aggregation.simulate_dropout is for the simulation; over the network dropouts are "
            "real (set it to 0)"
        )


def carry_secagg(strategy: Any, transport: Any) -> Any:
    """``strategy`` with its SecAgg summer's messages carried by ``transport`` when that is a networked
    transport started for SecAgg (then the updates stay on the clients); unchanged otherwise."""
    if not getattr(transport, "secure_aggregation", False):
        return strategy  # without it there is nothing to carry: SecAgg's modules (cryptography) stay unimported
    from fedtune.privacy.secagg.driver import SecureSummer

    summer = getattr(strategy, "summer", None)
    if isinstance(summer, SecureSummer) and getattr(transport, "secure_aggregation", False):
        strategy.summer = summer.over(transport)  # set once, before the first round
    return strategy
