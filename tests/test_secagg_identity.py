"""SecAgg identities: a participant signs with its mTLS key (deploy/certs.py) and the others check its
certificate against the federation's CA; the simulation's Ed25519 registry; a participant's peer holds
the round to its own configuration's floors."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fedtune.config.privacy import SecAggConfig
from fedtune.core.messages import ClientUpdate
from fedtune.deploy.certs import create_pki
from fedtune.privacy.errors import SecAggAbort
from fedtune.privacy.secagg.deploy import participant_peer
from fedtune.privacy.secagg.driver import LocalPeers, SecureSummer, run_rounds
from fedtune.privacy.secagg.identity import CaTrust, CertSigner, Ed25519Signer, Registry
from fedtune.privacy.secagg.messages import encode
from fedtune.privacy.secagg.server import SecAggServer
from fedtune.privacy.sums import SumPlan, plain_sum

NAMES = ["alice", "bob", "carol", "dave"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return create_pki(tmp_path_factory.mktemp("pki"), NAMES)


def _signer(pki, name: str) -> CertSigner:
    cert, key = pki.clients[name]
    return CertSigner(cert.read_bytes(), key.read_bytes())


def test_a_certificate_signature_verifies_only_for_its_cn_its_ca_and_its_data(pki, tmp_path) -> None:
    trust = CaTrust(pki.ca.read_bytes())
    alice = _signer(pki, "alice")
    sig = alice.sign(b"advert")
    assert trust.verify("alice", alice.credential, b"advert", sig)
    assert not trust.verify("bob", alice.credential, b"advert", sig)  # another client's name
    assert not trust.verify("alice", alice.credential, b"advert!", sig)  # other data
    assert not trust.verify("alice", b"not a certificate", b"advert", sig)
    assert not trust.verify("alice", _signer(pki, "bob").credential, b"advert", sig)  # another key
    other = create_pki(tmp_path / "other", ["alice"])  # a certificate for "alice" from another CA
    impostor = CertSigner(*(p.read_bytes() for p in other.clients["alice"]))
    assert not trust.verify("alice", impostor.credential, b"advert", impostor.sign(b"advert"))


def test_the_simulation_registry_trusts_only_registered_keys() -> None:
    a, b = Ed25519Signer.generate(), Ed25519Signer.generate()
    registry = Registry.of({"a": a})
    assert registry.verify("a", a.credential, b"x", a.sign(b"x"))
    assert not registry.verify("a", b.credential, b"x", b.sign(b"x"))
    assert not registry.verify("b", b.credential, b"x", b.sign(b"x"))
    assert not registry.verify("a", a.credential, b"x", b"\x00" * 64)


def _config_yaml(**secagg) -> str:
    return yaml.safe_dump({"seed": 3, "privacy": {"secure_aggregation": secagg}})


def test_participants_sum_with_certificate_identities_checked_against_the_ca(pki) -> None:
    """The deployment's identity path, in process: four participants' peers sign with their certificate
    keys, the server and each peer check against the CA, and the sum is the plaintext one within the
    quantisation bound."""
    d = 50
    rng = np.random.default_rng(0)
    ups = [ClientUpdate(n, 1, 5, rng.uniform(-0.5, 0.5, d).astype(np.float32), "s") for n in NAMES]
    cfg = SecAggConfig(threshold=0.6)
    summer = SecureSummer(cfg, seed=3)
    plan = SumPlan(round=1, numel=d, coord_bound=1.0)
    params = summer.params(plan, len(ups))
    pem = {n: tuple(p.read_bytes() for p in pki.clients[n]) for n in NAMES}
    peers = {
        u.client_id: participant_peer(
            u,
            ca=pki.ca.read_bytes(),
            cert=pem[u.client_id][0],
            key=pem[u.client_id][1],
            config_yaml=_config_yaml(threshold=0.6),
            seed=3,
            round_idx=1,
        )
        for u in ups
    }
    server = SecAggServer(params, NAMES, trust=CaTrust(pki.ca.read_bytes()))
    result = run_rounds(server, LocalPeers(peers))
    assert result.survivors == tuple(sorted(NAMES))
    total = result.total[:d] * (2.0 / params.levels) - len(NAMES) * 1.0
    np.testing.assert_allclose(total, plain_sum(ups, plan).total, atol=len(NAMES) * 2 / params.levels)


def test_a_participant_holds_the_server_to_its_own_floors(pki) -> None:
    update = ClientUpdate("alice", 1, 5, np.zeros(10, np.float32), "s")
    summer = SecureSummer(SecAggConfig(threshold=0.6), seed=3)
    params = summer.params(SumPlan(round=1, numel=10, coord_bound=1.0), 4)
    cert, key = (p.read_bytes() for p in pki.clients["alice"])

    def peer(config_yaml: str, *, seed: int = 3, round_idx: int = 1):
        return participant_peer(
            update, ca=pki.ca.read_bytes(), cert=cert, key=key, config_yaml=config_yaml, seed=seed, round_idx=round_idx
        )

    assert peer(_config_yaml(threshold=0.6)).respond(encode(params))  # a fair invitation is answered
    with pytest.raises(SecAggAbort, match=r"below this client's minimum 0\.8"):
        peer(_config_yaml(threshold=0.8)).respond(encode(params))
    with pytest.raises(SecAggAbort, match="graph seed"):
        peer(_config_yaml(threshold=0.6), seed=4).respond(encode(params))
    with pytest.raises(SecAggAbort, match="trained for round 2"):
        peer(_config_yaml(threshold=0.6), round_idx=2).respond(encode(params))
