"""How the loop forms a sum strategy's sum: in the clear, or by secure aggregation over what the transport
declares it can carry (``Transport.capabilities``). The strategy never sees the transport.
"""

from __future__ import annotations

from fedtune.config.schema import Config
from fedtune.errors import ConfigError
from fedtune.privacy.sums import Summer, plain_sum
from fedtune.transport.base import Transport


def summer_for(config: Config, transport: Transport) -> Summer:
    """How the loop forms a sum strategy's sum: in the clear, or by SecAgg. With SecAgg, a transport that
    declares ``secure_sum`` carries the protocol's messages (the updates stay on the clients); a simulated
    one hands over the updates and the clients' protocol objects run here. Refuses any other transport."""
    secagg = config.privacy.secure_aggregation
    if secagg is None:
        return plain_sum
    check_secagg_transport(config, transport)
    from fedtune.privacy.secagg.driver import SecureSummer

    summer = SecureSummer(secagg, seed=config.seed, ca_path=config.deployment.tls_ca)
    return summer.over(transport) if transport.capabilities.secure_sum else summer  # type: ignore[arg-type]


def check_secagg_transport(config: Config, transport: Transport) -> None:
    """Refuse SecAgg where it cannot keep its promise, with a ConfigError naming the problem.

    In the simulation the clients' protocol objects run in this process (the in-process driver). A
    networked transport must carry the five message rounds itself (``secagg_exchange``, the
    SecAggNetwork seam) and have been started for it, so that updates stay on the clients; otherwise the
    server would receive plaintext updates. Over the network, update compression is refused: the client
    sends only its masked vector (uniform in Z_R, incompressible), so a codec would silently not apply;
    and simulated dropouts are refused: dropouts there are real.
    """
    secagg = config.privacy.secure_aggregation
    capabilities = transport.capabilities
    if secagg is None or capabilities.simulated:
        return
    if not capabilities.secure_sum:
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
