"""Quantisation of float updates into Z_R, R = 2^b with b <= 32, so that the sum of n clients never wraps.

A client value x in [lo, hi] becomes an integer in [0, L] by unbiased stochastic rounding of
(x - lo) / (hi - lo) * L. With L <= (R - 1) // n, any sum of at most n such integers is below R, so the
masked sum taken mod R is the true integer sum, and dequantisation is exact up to rounding:
sum_k x_k = count * lo + S * (hi - lo) / L.

Two ways to pick the field:

* ``value_bits=None``: R = 2^32 and L = (2^32 - 1) // n (the most precision a 32-bit field allows);
* ``value_bits=v``: L = 2^v - 1 and R = 2^(v + ceil(log2 n)), which must fit in 32 bits (Bonawitz et al.'s
  setting: 16-bit values, 2^10 clients -> a 26-bit field).

In memory a field vector uses the smallest container that holds R: uint16 for R <= 2^16, uint32
otherwise (never int64). On the wire it is bit-packed to exactly b bits a value (messages.py).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedtune.privacy.errors import PrivacyError

MAX_FIELD_BITS = 32


@dataclass(frozen=True)
class FieldSpec:
    modulus_bits: int  # R = 2^modulus_bits
    levels: int  # L: each client value is an integer in [0, L]

    @property
    def modulus(self) -> int:
        return 1 << self.modulus_bits

    @property
    def dtype(self) -> np.dtype:
        return container(self.modulus_bits)

    def max_clients(self) -> int:
        return (self.modulus - 1) // self.levels


def container(bits: int) -> np.dtype:
    """The in-memory dtype of a vector of ``bits``-bit field elements (bits <= 32)."""
    return np.dtype("<u2") if bits <= 16 else np.dtype("<u4")


def field_for(num_clients: int, *, value_bits: int | None) -> FieldSpec:
    """The field for at most ``num_clients`` summands.

    >>> field_for(1024, value_bits=16)
    FieldSpec(modulus_bits=26, levels=65535)
    >>> field_for(10, value_bits=None).levels == (2**32 - 1) // 10
    True
    """
    if num_clients < 1:
        raise ValueError("need at least one client")
    if value_bits is None:
        return FieldSpec(MAX_FIELD_BITS, (2**MAX_FIELD_BITS - 1) // num_clients)
    bits = value_bits + max(1, math.ceil(math.log2(num_clients)))
    if bits > MAX_FIELD_BITS:
        raise PrivacyError(
            f"privacy.secure_aggregation.value_bits={value_bits} with {num_clients} clients needs a "
            f"{bits}-bit field; the limit is {MAX_FIELD_BITS} (lower value_bits or sample fewer clients)"
        )
    spec = FieldSpec(bits, 2**value_bits - 1)
    assert spec.max_clients() >= num_clients
    return spec


def private_rng() -> np.random.Generator:
    """A rounding stream only this client knows: seeded with 256 bits from the OS (``secrets``), never from
    the run's public seed, so the server cannot predict a client's rounding and peel it off its sum."""
    return np.random.default_rng(secrets.randbits(256))


def count_clipped(x: np.ndarray, lo: float, hi: float) -> int:
    """How many values fall outside [lo, hi] (and so are clipped by quantisation)."""
    return int(np.count_nonzero((x < lo) | (x > hi)))


def quantize(x: np.ndarray, *, lo: float, hi: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Stochastically rounded integers in [0, levels] (uint32), unbiased: E[dequantised] = clip(x)."""
    if not hi > lo:
        raise ValueError("need hi > lo")
    if not np.all(np.isfinite(x)):
        raise PrivacyError("cannot quantise NaN or Inf for secure aggregation (the update is refused)")
    scaled = (np.clip(x.astype(np.float64), lo, hi) - lo) * (levels / (hi - lo))
    floor = np.floor(scaled)
    up = rng.random(x.shape[0]) < (scaled - floor)
    return np.minimum(floor + up, levels).astype(np.uint32)


def dequantize_sum(total: np.ndarray, *, lo: float, hi: float, levels: int, count: int) -> np.ndarray:
    """The float64 sum of ``count`` clients' values from the integer sum of their quantised values."""
    return count * lo + total.astype(np.float64) * ((hi - lo) / levels)


def step(lo: float, hi: float, levels: int) -> float:
    return (hi - lo) / levels


def shrink_for_rounding(x: np.ndarray, *, l2_bound: float, step_size: float) -> np.ndarray:
    """Scale x so that after per-coordinate rounding (error < step) its L2 norm is still <= l2_bound.

    Stochastic rounding moves each coordinate by less than one step, so ||q(x) - x|| < sqrt(d) * step;
    shrinking ||x|| to l2_bound - sqrt(d) * step keeps the quantised update inside DP's sensitivity bound.
    """
    slack = math.sqrt(x.shape[0]) * step_size
    target = l2_bound - slack
    if target < 0.5 * l2_bound:
        raise PrivacyError(
            f"the SecAgg field is too coarse for {x.shape[0]} values at clip {l2_bound:g}: rounding could add "
            f"{slack:.3g} to the norm; raise value_bits (or leave it null for 32 bits) or sample fewer clients"
        )
    norm = math.sqrt(float(np.dot(x.astype(np.float64), x.astype(np.float64))))
    if norm <= target:
        return x
    return (x.astype(np.float64) * (target / norm)).astype(np.float32)
