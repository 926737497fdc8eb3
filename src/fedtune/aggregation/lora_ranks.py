"""Heterogeneous LoRA ranks: moving an adapter between the global rank r and a client's rank r_k <= r.

Every client holds the global adapter's layout (A: r x in, B: out x r), so all clients share one parameter
spec; a client of rank r_k uses only the first r_k components and is, exactly, a rank-r_k LoRA with its own
scaling s_k = alpha / r_k (alpha / sqrt(r_k) under rsLoRA), where the global adapter has s = alpha / r:

    global -> client   B_k = (s / s_k) B[:, :r_k],  A_k = A[:r_k]      so  s_k B_k A_k = s B[:, :r_k] A[:r_k]
    client -> global   B~  = (s_k / s) B_k,          A~  = A_k          so  s B~ A~     = s_k B_k A_k

and zeros beyond r_k. The rescaling sits on B alone, so A keeps peft's initial distribution (it does not
depend on the rank). A client's reply is sent in global units (B~, A~): the server's sums over clients are
then sums of the clients' true weight changes, whatever their ranks -- the inconsistent alpha/r scaling
reported for FLoRA implementations (each client's product scaled by alpha / sum r_k) cannot happen.

Pure functions over flat float32 vectors; inputs are never modified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedtune.aggregation.lora import LoraPair


def scale_ratio(rank: int, full: int, *, rslora: bool) -> float:
    """s_k / s for a rank-``rank`` client of a rank-``full`` adapter (alpha cancels)."""
    if not 0 < rank <= full:
        raise ValueError(f"a client rank must be in 1..{full}, got {rank}")
    return (full / rank) ** 0.5 if rslora else full / rank


def _rewrite(flat: np.ndarray, pairs: Sequence[LoraPair], rank: int, rslora: bool, *, to_client: bool) -> np.ndarray:
    out = np.array(flat, dtype=np.float32, copy=True)
    for pair in pairs:
        r = min(rank, pair.rank)  # a layer of smaller rank (peft rank_pattern) keeps its own
        ratio = scale_ratio(r, pair.rank, rslora=rslora)
        b, a = pair.factors(out)
        factor = 1.0 / ratio if to_client else ratio
        b_new, a_new = np.zeros_like(b), np.zeros_like(a)
        b_new[:, :r] = b[:, :r] * factor
        a_new[:r] = a[:r]
        out = pair.write(out, b_new, a_new)
    return out


def to_client_rank(flat: np.ndarray, pairs: Sequence[LoraPair], rank: int, *, rslora: bool = False) -> np.ndarray:
    """The vector a rank-``rank`` client starts from: the global adapter truncated, B scaled by s / s_k.

    >>> from fedtune.core.params import ParamSpec
    >>> from fedtune.aggregation.lora import lora_pairs
    >>> spec = ParamSpec(("m.lora_A.weight", "m.lora_B.weight"), ((2, 1), (1, 2)), ("float32",) * 2)
    >>> to_client_rank(np.array([1, 2, 3, 4], np.float32), lora_pairs(spec), 1).tolist()  # s / s_k = 1 / 2
    [1.0, 0.0, 1.5, 0.0]
    """
    return _rewrite(flat, pairs, rank, rslora, to_client=True)


def from_client_rank(flat: np.ndarray, pairs: Sequence[LoraPair], rank: int, *, rslora: bool = False) -> np.ndarray:
    """A rank-``rank`` client's vector in global units (B scaled by s_k / s, zeros beyond the rank)."""
    return _rewrite(flat, pairs, rank, rslora, to_client=False)


# --------------------------------------------------------------------------------------------- HetLoRA
# Cho et al. 2024 (fedtune.server.strategies.hetlora): rank self-pruning on the client, sparsity-weighted
# aggregation on the server. ``rank`` is the client's rank r_k; a layer of smaller rank keeps its own.


def kept_rank(rank: int, gamma: float) -> int:
    """floor(gamma r_k): the components a client keeps when it prunes (the tail gamma r_k : r_k goes).
    (A hair added before the floor: 0.29 * 100 is 28.999... in floating point, and means 29.)"""
    return math.floor(gamma * rank + 1e-9)


def tail_norm(flat: np.ndarray, pairs: Sequence[LoraPair], rank: int, gamma: float) -> float:
    """P_k = sum_layers ||B_k[:, g:r_k]||_F ||A_k[g:r_k]||_F with g = floor(gamma r_k): the size of the
    components self-pruning would remove (the paper's regulariser, evaluated). ``flat`` in client units.

    >>> from fedtune.core.params import ParamSpec
    >>> from fedtune.aggregation.lora import lora_pairs
    >>> spec = ParamSpec(("m.lora_A.weight", "m.lora_B.weight"), ((2, 1), (1, 2)), ("float32",) * 2)
    >>> tail_norm(np.array([1, 2, 3, 4], np.float32), lora_pairs(spec), 2, 0.5)  # |A[1]| |B[:, 1]| = 2 * 4
    8.0
    """
    total = 0.0
    for pair in pairs:
        r = min(rank, pair.rank)
        g = kept_rank(r, gamma)
        b, a = pair.factors(flat)
        total += float(np.linalg.norm(b[:, g:r]) * np.linalg.norm(a[g:r]))
    return total


def product_norm(flat: np.ndarray, pairs: Sequence[LoraPair], rank: int) -> float:
    """||Delta W_k||_F over all layers, Delta W_k = B~_k[:, :r_k] A~_k[:r_k] (global units): the weight of a
    reply in HetLoRA's sparsity-weighted aggregation, up to the common factor s = alpha / r."""
    total = 0.0
    for pair in pairs:
        r = min(rank, pair.rank)
        b, a = pair.factors(flat)
        total += float(np.sum((b[:, :r] @ a[:r]) ** 2))
    return math.sqrt(total)


def zero_beyond(flat: np.ndarray, pairs: Sequence[LoraPair], rank: int) -> np.ndarray:
    """A copy of ``flat`` whose LoRA components beyond ``rank`` are zero (what a rank-r_k reply may hold)."""
    out = np.array(flat, dtype=np.float32, copy=True)
    for pair in pairs:
        r = min(rank, pair.rank)
        b, a = pair.factors(out)
        b[:, r:] = 0.0
        a[r:] = 0.0
        out = pair.write(out, b, a)
    return out
