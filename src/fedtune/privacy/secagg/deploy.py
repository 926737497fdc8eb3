"""The SecAgg peer of a gRPC participant: its update, its mTLS identity, the CA it trusts, its own floors.

The participant signs its key advertisement and its view of the survivor set with the private key of
its TLS certificate (issued by ``fedtune certs``), and checks every other participant's certificate
against the federation's CA (``identity.CaTrust``). Its floors under the server's parameters come from the
``privacy.secure_aggregation`` section of the configuration it runs with (pinned by the participant's own
``--config`` when it gives one; docs/PRIVACY.md says why that matters).
"""

from __future__ import annotations

import yaml

from fedtune.config.privacy import PrivacyConfig
from fedtune.core.messages import ClientUpdate
from fedtune.errors import UpdateRejected
from fedtune.privacy.secagg.identity import CaTrust, CertSigner
from fedtune.privacy.secagg.peer import SecAggPeer
from fedtune.privacy.secagg.policy import ClientPolicy


def participant_peer(
    update: ClientUpdate, *, ca: bytes, cert: bytes, key: bytes, config_yaml: str, seed: int, round_idx: int
) -> SecAggPeer:
    """The peer that answers this round's SecAgg tasks for ``update`` (UpdateRejected when it cannot)."""
    try:
        signer, trust = CertSigner(cert, key), CaTrust(ca)
    except ValueError as err:
        raise UpdateRejected(f"secure aggregation signs with this client's certificate key: {err}") from None
    config = yaml.safe_load(config_yaml) or {}
    section = PrivacyConfig.model_validate((config.get("privacy") or {}) if isinstance(config, dict) else {})
    if section.secure_aggregation is None:
        raise UpdateRejected("the configuration has no privacy.secure_aggregation section to hold the round to")
    policy = ClientPolicy.from_config(section.secure_aggregation, seed=seed, round_idx=round_idx)
    return SecAggPeer.holding(update, identity=signer, trust=trust, policy=policy)
