"""Shamir t-of-n secret sharing (Shamir 1979) over GF(p), p = 2^521 - 1 (a Mersenne prime).

Secrets are 32-byte strings (X25519 private keys, mask seeds) read as integers below 2^256 < p. Share
x-coordinates are small positive integers (a client's index in the round's roster). Any t shares give
the secret back; fewer reveal nothing about it. Coefficients come from ``secrets`` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for each x, with f of degree threshold - 1 and f(0) = secret.

    >>> shares = split(bytes(range(32)), threshold=3, xs=[1, 2, 3, 4, 5])
    >>> reconstruct({x: shares[x] for x in (2, 4, 5)}) == bytes(range(32))
    True
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and nonzero")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def interpolate_at_zero(shares: Mapping[int, int]) -> int:
    """f(0) of the lowest-degree polynomial through ``shares`` (Lagrange, one inversion)."""
    xs = list(shares)
    den, total = 1, 0
    # sum_j y_j * prod_{m != j} x_m / (x_m - x_j), as one fraction over a common denominator
    for j, xj in enumerate(xs):
        n_j, d_j = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                n_j = n_j * xm % PRIME
                d_j = d_j * (xm - xj) % PRIME
        total = (total * d_j + shares[xj] * n_j * den) % PRIME
        den = den * d_j % PRIME
    return total * pow(den, -1, PRIME) % PRIME


def reconstruct(shares: Mapping[int, int]) -> bytes:
    """The 32-byte secret from at least threshold shares (the caller chooses which)."""
    value = interpolate_at_zero(shares)
    if value >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares do not interpolate to a 32-byte secret (inconsistent or tampered)")
    return value.to_bytes(SECRET_BYTES, "big")


def encode_share(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ValueError("a share is 66 bytes")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("share outside the field")
    return value
