"""Every random stream in fedtune is derived from one seed and a scope path.

``derive_seed(seed, "sampling", round)`` always gives the same 64-bit seed, different for every scope, so
client sampling, data shuffling, dropout, DP noise and masks are independent yet reproducible, and a
resumed run draws exactly what an uninterrupted run would.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *scope: object) -> int:
    """A 63-bit seed from ``seed`` and a scope path (strings and integers).

    >>> derive_seed(0, "sampling", 1) == derive_seed(0, "sampling", 1)
    True
    >>> derive_seed(0, "sampling", 1) != derive_seed(0, "sampling", 2)
    True
    """
    text = "/".join([str(int(seed)), *(str(s) for s in scope)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def derive_rng(seed: int, *scope: object) -> np.random.Generator:
    """A NumPy generator for one scope (not for cryptographic use)."""
    return np.random.default_rng(derive_seed(seed, *scope))


def derive_torch_generator(seed: int, *scope: object) -> torch.Generator:
    """A CPU torch generator for one scope."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *scope))
    return gen
