"""Gaussian noise for DP, from a seeded stream (reproducible) or a CSPRNG (production).

Seeded mode derives its stream from ``derive_rng(seed, *scope)``, so the seed reaches the noise and a
resumed run adds exactly the noise an uninterrupted one would. Secure mode draws a fresh 256-bit key from
the OS and expands it with ChaCha20 (``cryptography``), so nobody, including whoever knows the config
seed, can predict or replay the noise. Neither mode defends against floating-point side channels in
Gaussian sampling (Mironov 2012); see docs/PRIVACY.md.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.core.rng import derive_rng


def chacha_bytes(key: bytes, nonce: bytes, nbytes: int) -> bytes:
    """``nbytes`` of the ChaCha20 keystream for a 32-byte key and a 16-byte nonce (counter || nonce)."""
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


class SecureGenerator:
    """Uniforms and normals from one ChaCha20 keystream under a key from ``os.urandom``.

    The keystream is read once, in order: each call takes the next unread bytes, so no two draws (nor the
    two uniforms of Box-Muller) ever share a keystream block. ``key`` is for tests only (a fixed key makes
    the output reproducible, which production noise must never be).
    """

    # ChaCha20's block counter is 32 bits: 2^32 blocks of 64 bytes under one (key, nonce)
    MAX_BYTES = 64 << 32

    def __init__(self, *, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._used = 0  # keystream bytes consumed so far

    def _uint64(self, n: int) -> np.ndarray:
        # 8 bytes a word, and 64-byte blocks: the position only ever advances, never rewinds
        self._used += 8 * n
        if self._used > self.MAX_BYTES:
            raise OverflowError("SecureGenerator: keystream exhausted (256 GiB under one key); use a new generator")
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype="<u8")

    def random(self, n: int) -> np.ndarray:
        """Uniform floats in the open interval (0, 1), 53 random bits each."""
        return ((self._uint64(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def standard_normal(self, n: int) -> np.ndarray:
        """Box-Muller on pairs of open-interval uniforms."""
        half = (n + 1) // 2
        u1, u2 = self.random(half), self.random(half)
        radius = np.sqrt(-2.0 * np.log(u1))
        out = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
        return out[:n]


def noise_generator(*, seed: int, scope: tuple, secure: bool) -> np.random.Generator | SecureGenerator:
    """The generator DP noise and DP sampling draw from: seeded per scope, or secure."""
    return SecureGenerator() if secure else derive_rng(seed, *scope)


def gaussian(size: int, std: float, *, seed: int, scope: tuple, secure: bool = False) -> np.ndarray:
    """``size`` independent N(0, std^2) draws as float64.

    >>> a = gaussian(4, 1.0, seed=1, scope=("dp-noise", 3))
    >>> b = gaussian(4, 1.0, seed=1, scope=("dp-noise", 3))
    >>> bool((a == b).all()), bool((a != gaussian(4, 1.0, seed=2, scope=("dp-noise", 3))).all())
    (True, True)
    """
    if std < 0:
        raise ValueError(f"noise std must be non-negative, got {std}")
    gen = noise_generator(seed=seed, scope=scope, secure=secure)
    return gen.standard_normal(size) * std
