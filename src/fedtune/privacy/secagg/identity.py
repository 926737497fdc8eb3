"""Who signed what: each participant's long-term identity key, and the trust a party places in the others'.

Bonawitz et al. 2017's malicious-server variant assumes a PKI: every client signs its key advertisement
and its view of the survivor set with a key the others can check, so a server can neither substitute a
client's keys (a man in the middle on the masking keys) nor show different clients different survivor
sets without being caught. Two deployments of that PKI:

* the gRPC deployment: the identity is the participant's mTLS key (ECDSA P-256, issued by
  ``fedtune certs``); the credential sent with a signature is its certificate, checked against the
  federation's CA, and its common name must be the client id (``CaTrust``);
* the simulation: each simulated client draws a fresh Ed25519 key; the simulation trusts a registry of
  their public keys (``Registry``).

Both sides are pure checks that return False on anything malformed: a bad signature never raises.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


class Signer(Protocol):
    """A participant's own identity: signs with its private key, shows ``credential`` to be checked."""

    @property
    def credential(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


class Trust(Protocol):
    """Whether ``signature`` over ``data`` was made by ``client_id`` (``credential`` as it presented it)."""

    def verify(self, client_id: str, credential: bytes, data: bytes, signature: bytes) -> bool: ...


# ----- the simulation: Ed25519 keys and a registry --------------------------------------------------------


@dataclass(frozen=True)
class Ed25519Signer:
    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())

    @property
    def credential(self) -> bytes:
        return self.key.public_key().public_bytes(**_RAW)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


class Registry:
    """The public identity keys a simulation trusts, by client id (no key: not trusted)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self.keys = dict(keys)

    @classmethod
    def of(cls, signers: Mapping[str, Signer]) -> Registry:
        return cls({cid: s.credential for cid, s in signers.items()})

    def verify(self, client_id: str, credential: bytes, data: bytes, signature: bytes) -> bool:
        known = self.keys.get(client_id)
        if known is None or credential != known:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(known).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


# ----- the deployment: mTLS keys and certificates checked against the CA ----------------------------------


class CertSigner:
    """Signs with a participant's TLS private key (PEM); its credential is its certificate (DER)."""

    def __init__(self, cert_pem: bytes, key_pem: bytes) -> None:
        self._cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("SecAgg signs with the participant's ECDSA certificate key (fedtune certs)")
        self._key = key

    @property
    def credential(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.DER)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


class CaTrust:
    """Trusts a certificate the federation's CA issued, valid now, whose CN is the signer's client id.

    Revocation is the server's (it refuses a revoked certificate at the TLS layer); a participant holds
    only the CA certificate. See docs/PRIVACY.md for what a server that also holds the CA key can do.
    """

    def __init__(self, ca_pem: bytes) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_pem)

    def verify(self, client_id: str, credential: bytes, data: bytes, signature: bytes) -> bool:
        try:
            cert = x509.load_der_x509_certificate(credential)
            cert.verify_directly_issued_by(self.ca)
            now = dt.datetime.now(dt.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                return False
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if [n.value for n in names] != [client_id]:
                return False
            key = cert.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def advert_data(round_idx: int, client_id: str, c_pk: bytes, s_pk: bytes, params_digest: bytes) -> bytes:
    """What a key advertisement signs: the round, the client, both public keys and the round's parameters."""
    cid = client_id.encode()
    return (
        b"fedtune-secagg/advert/"
        + round_idx.to_bytes(8, "little")
        + len(cid).to_bytes(2, "little")
        + cid
        + c_pk
        + s_pk
        + params_digest
    )


def survivors_data(round_idx: int, survivors: tuple[str, ...], params_digest: bytes) -> bytes:
    """What a consistency signature signs: the round, its parameters and the sorted survivor set U3."""
    body = b"".join(len(c.encode()).to_bytes(2, "little") + c.encode() for c in sorted(survivors))
    return b"fedtune-secagg/survivors/" + round_idx.to_bytes(8, "little") + params_digest + body
