"""Primitives from ``cryptography``: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305, ChaCha20 masks.

Never NumPy's RNG: every secret and every mask comes from ``os.urandom`` or a ChaCha20 keystream.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.privacy.noise import chacha_bytes

KEY_BYTES = 32  # X25519 keys, AEAD keys, mask seeds: 256 bits
NONCE_BYTES = 12
_PROBE = X25519PrivateKey.generate()  # valid_public's throwaway key
_RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(**_RAW)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_of(raw_private: bytes) -> bytes:
    """The public key of a raw private key (checks a reconstructed secret against its advertised key)."""
    return public_bytes(private_from_bytes(raw_private))


def valid_public(raw: bytes) -> bool:
    """Whether ``raw`` is a usable X25519 public key: 32 bytes and not of small order.

    X25519 private scalars are multiples of 8, so a point of order dividing 8 (the all-zero key among
    them) gives the all-zero shared secret with every key; ``cryptography`` refuses that exchange with a
    ValueError. One exchange with a throwaway key therefore tells such a key from a good one (the probe
    key is used for nothing else and its outputs are discarded).
    """
    if len(raw) != KEY_BYTES:
        return False
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def agree(key: X25519PrivateKey, peer_public: bytes, *, info: bytes) -> bytes:
    """A 32-byte key both parties derive: HKDF-SHA256 of the X25519 shared secret, bound to ``info``."""
    shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))  # raises on low-order points
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || ChaCha20-Poly1305(plaintext), authenticated together with ``aad``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the ciphertext, its nonce or ``aad`` was altered."""
    if len(blob) < NONCE_BYTES + 16:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        return None


def mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` uniform values mod 2^modulus_bits (uint32) from the ChaCha20 keystream of ``seed``.

    Each seed masks one vector of one round (seeds are per-round), so a fixed nonce is never reused.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError("mask seeds are 32 bytes")
    words = np.frombuffer(chacha_bytes(seed, bytes(16), 4 * length), dtype="<u4")
    if modulus_bits == 32:
        return words.copy()
    return words & np.uint32((1 << modulus_bits) - 1)


def commitment(label: bytes, secret: bytes) -> bytes:
    """SHA-256 commitment to a 256-bit secret (hiding: the secret has full entropy)."""
    return hashlib.sha256(b"fedtune-secagg/commit/" + label + b"/" + secret).digest()
