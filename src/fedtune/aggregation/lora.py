"""LoRA-aware aggregation math over flat float32 vectors (no peft, no torch).

A LoRA module's weight change is s * B @ A with A (r, in) and B (out, r). Averaging A and B separately is
not averaging the change:

    mean_k(B_k) @ mean_k(A_k)  !=  sum_k p_k B_k A_k        (naive FedAvg of the factors)

The difference is the weighted covariance of the client factors. The functions here compute the exact
weighted mean of the products and three ways of representing it again as adapters:

* ``stack_adapters`` (FLoRA, Wang et al. 2024): concatenate [A_1; ...; A_K] and [p_1 B_1, ..., p_K B_K];
  their product is sum_k p_k B_k A_k exactly, whatever each client's rank r_k.
* ``fedex_residual`` (FedEx-LoRA, Singhal et al. 2024): keep the averaged factors and the dense remainder
  sum_k p_k B_k A_k - mean(B) @ mean(A), which the model must add to its frozen base weight.
* ``svd_reproject``: the best rank-r factors of a dense product (Eckart-Young), exact when its rank <= r.

The scaling s = alpha / r is applied by whoever adds a product to a base weight; products here are B @ A.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedtune.core.params import ParamSpec

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraPair:
    """Where one LoRA module's A (r, in) and B (out, r) sit in the flat vector."""

    module: str  # the adapted layer's name, e.g. "...layers.0.self_attn.q_proj"
    a: tuple[int, int]  # (start, stop) of A in the flat vector
    b: tuple[int, int]
    rank: int
    in_features: int
    out_features: int

    def factors(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B (out, r), A (r, in)) as float64 copies."""
        b = flat[self.b[0] : self.b[1]].astype(np.float64).reshape(self.out_features, self.rank)
        a = flat[self.a[0] : self.a[1]].astype(np.float64).reshape(self.rank, self.in_features)
        return b, a

    def product(self, flat: np.ndarray) -> np.ndarray:
        """B @ A, (out, in) float64."""
        b, a = self.factors(flat)
        return b @ a

    def write(self, flat: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
        """A copy of ``flat`` with this module's factors replaced."""
        out = np.array(flat, dtype=np.float32, copy=True)
        out[self.b[0] : self.b[1]] = np.asarray(b, dtype=np.float32).reshape(-1)
        out[self.a[0] : self.a[1]] = np.asarray(a, dtype=np.float32).reshape(-1)
        return out


def lora_pairs(spec: ParamSpec) -> list[LoraPair]:
    """Every (lora_A, lora_B) pair in the spec, in spec order; raises if a factor lacks its partner."""
    where = {name: (start, stop, shape) for name, start, stop, shape in spec.offsets()}
    pairs = []
    for name in spec.names:
        if not name.endswith(A_SUFFIX):
            continue
        module = name.removesuffix(A_SUFFIX)
        b_name = module + B_SUFFIX
        if b_name not in where:
            raise ValueError(f"LoRA factor {name!r} has no matching {b_name!r} in the exchanged parameters")
        a_start, a_stop, a_shape = where[name]
        b_start, b_stop, b_shape = where[b_name]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(f"LoRA module {module!r}: A {list(a_shape)} and B {list(b_shape)} ranks disagree")
        pairs.append(LoraPair(module, (a_start, a_stop), (b_start, b_stop), a_shape[0], a_shape[1], b_shape[0]))
    orphans = [n for n in spec.names if n.endswith(B_SUFFIX) and n.removesuffix(B_SUFFIX) + A_SUFFIX not in where]
    if orphans:
        raise ValueError(f"LoRA factor {orphans[0]!r} has no matching lora_A in the exchanged parameters")
    return pairs


def lora_b_only(spec: ParamSpec) -> list[str]:
    """The lora_B names of a spec that exchanges B alone (FFA-LoRA: A frozen at build time).

    Raises ValueError naming the problem when the spec holds a lora_A (A was not frozen) or no lora_B.
    """
    a_names = [n for n in spec.names if n.endswith(A_SUFFIX)]
    if a_names:
        raise ValueError(
            f"FFA-LoRA exchanges only lora_B, but {a_names[0]!r} is trainable: build the model with its "
            "lora_A frozen (fedtune.models.lora.freeze_lora_a)"
        )
    b_names = [n for n in spec.names if n.endswith(B_SUFFIX)]
    if not b_names:
        raise ValueError("FFA-LoRA needs LoRA adapters, but the model exchanges no lora_B")
    return b_names


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or (w <= 0).any():
        raise ValueError("weights must be a non-empty sequence of positive numbers")
    return w / w.sum()


def product_mean(factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> np.ndarray:
    """sum_k p_k B_k A_k with p = weights / sum(weights); (out, in) float64. Ranks may differ per client."""
    p = _normalised(weights)
    return sum(pk * (b.astype(np.float64) @ a.astype(np.float64)) for pk, (b, a) in zip(p, factors, strict=True))


def naive_product(factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> np.ndarray:
    """mean(B) @ mean(A): what averaging the factors separately yields (same rank required)."""
    p = _normalised(weights)
    b = sum(pk * f[0].astype(np.float64) for pk, f in zip(p, factors, strict=True))
    a = sum(pk * f[1].astype(np.float64) for pk, f in zip(p, factors, strict=True))
    return b @ a


def stack_adapters(
    factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA stacking: (B_s (out, sum r_k), A_s (sum r_k, in)) with B_s @ A_s = sum_k p_k B_k A_k exactly.

    >>> f = [(np.ones((2, 1)), np.ones((1, 3))), (np.ones((2, 2)), np.full((2, 3), 2.0))]
    >>> b, a = stack_adapters(f, [1, 3]); b.shape, a.shape
    ((2, 3), (3, 3))
    >>> bool(np.allclose(b @ a, product_mean(f, [1, 3])))
    True
    """
    p = _normalised(weights)
    b_stack = np.concatenate([pk * b.astype(np.float64) for pk, (b, _) in zip(p, factors, strict=True)], axis=1)
    a_stack = np.concatenate([a.astype(np.float64) for _, a in factors], axis=0)
    return b_stack, a_stack


def fedex_residual(factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]) -> np.ndarray:
    """FedEx-LoRA's base-weight correction: sum_k p_k B_k A_k - mean(B) @ mean(A), (out, in) float64."""
    return product_mean(factors, weights) - naive_product(factors, weights)


def svd_reproject(
    product: np.ndarray, rank: int, *, a_row_norm: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(B (out, rank), A (rank, in), relative Frobenius error) of the best rank-``rank`` approximation.

    Without ``a_row_norm`` the factors are balanced (B = U sqrt(S), A = sqrt(S) V^T). With it, A = c V^T
    (every row of norm c) and B = U S / c: the same product, but A keeps the scale it had. That matters for
    training the result further: balanced factors of a small product are both small, so a local optimiser
    step moves the product less (and a zero singular value leaves a dead component with A row = B column
    = 0, whose gradients are both zero); see docs/STRATEGIES.md, "Why svd learned more slowly".
    """
    u, s, vt = np.linalg.svd(np.asarray(product, dtype=np.float64), full_matrices=False)
    k = min(rank, s.size)
    b = np.zeros((product.shape[0], rank))
    a = np.zeros((rank, product.shape[1]))
    if a_row_norm is None:
        root = np.sqrt(s[:k])
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vt[:k]
    else:
        if not a_row_norm > 0:
            raise ValueError(f"a_row_norm must be positive, got {a_row_norm}")
        b[:, :k] = u[:, :k] * (s[:k] / a_row_norm)
        a[:k] = a_row_norm * vt[:k]
    total = float(np.sqrt((s**2).sum()))
    error = float(np.sqrt((s[k:] ** 2).sum())) / total if total > 0 else 0.0
    return b, a, error


def truncate_rank(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rank`` components of a client's adapter (heterogeneous-rank clients train only these)."""
    return b[:, :rank], a[:rank]


# ------------------------------------------------------------------ the residual's increment, in factored form
#
# A participant that holds last round's residual R needs only this round's increment dR to hold the new one.
# dR has low rank, so it can travel as two thin factors instead of an (out, in) matrix:
#
#   fedex: dR = sum_k p_k B_k A_k - mean(B) mean(A) = sum_k p_k (B_k - mean(B)) (A_k - c)   for any c,
#          since sum_k p_k (B_k - mean(B)) = 0; with c = A_K the K-th term vanishes: rank <= (K - 1) r.
#   svd:   dR = P - (best rank-r part of P), the tail of P's SVD; P = sum_k p_k B_k A_k has rank <= K r,
#          so the tail has rank <= (K - 1) r.
#
# Neither can be smaller in general: a generic rank-m (out, in) matrix has m (out + in - m) degrees of freedom,
# and the participant knows none of the other clients' factors. So an exact downlink costs about K times the
# adapter itself a round (K clients a round), and the dense (out, in) matrix is cheaper once
# (K - 1) r (out + in) > out * in: ``factored_is_smaller`` decides per module.


def fedex_increment_factors(
    factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(B_d (out, (K-1) r), A_d ((K-1) r, in)) with B_d @ A_d = ``fedex_residual(factors, weights)``.

    >>> rng = np.random.default_rng(0)
    >>> f = [(rng.normal(size=(5, 2)), rng.normal(size=(2, 4))) for _ in range(3)]
    >>> b, a = fedex_increment_factors(f, [1, 2, 3]); b.shape, a.shape
    ((5, 4), (4, 4))
    >>> bool(np.allclose(b @ a, fedex_residual(f, [1, 2, 3])))
    True
    """
    p = _normalised(weights)
    b_mean = sum(pk * b.astype(np.float64) for pk, (b, _) in zip(p, factors, strict=True))
    a_last = factors[-1][1].astype(np.float64)
    out, inner = factors[0][0].shape[0], factors[0][1].shape[1]
    if len(factors) == 1:
        return np.zeros((out, 0)), np.zeros((0, inner))
    rest = zip(p[:-1], factors[:-1], strict=True)
    b_d = np.concatenate([pk * (b.astype(np.float64) - b_mean) for pk, (b, _) in rest], axis=1)
    a_d = np.concatenate([a.astype(np.float64) - a_last for _, a in factors[:-1]], axis=0)
    return b_d, a_d


def svd_tail_factors(product: np.ndarray, rank: int, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(B_d, A_d) with B_d @ A_d = ``product`` minus its best rank-``rank`` part, keeping the singular
    components rank .. ``bound`` (``bound`` = K r: the product's rank cannot exceed it, so the rest is zero up
    to rounding). The same split as ``svd_reproject``: exact where that one is."""
    u, s, vt = np.linalg.svd(np.asarray(product, dtype=np.float64), full_matrices=False)
    stop = min(bound, s.size)
    start = min(rank, stop)
    return u[:, start:stop] * s[start:stop], vt[start:stop]


def factored_is_smaller(increment_rank: int, out_features: int, in_features: int) -> bool:
    """Whether (out, k) and (k, in) factors hold fewer numbers than the (out, in) matrix they multiply to."""
    return increment_rank * (out_features + in_features) < out_features * in_features


def add_increment(residual: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``residual`` + ``b`` @ ``a`` in float64, rounded once to float32 (a new array).

    The one rule by which the server and every participant advance a residual: applied to the same float32
    factors, their copies agree to float rounding round after round (there is no drift to correct).
    """
    product = np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64)
    return (np.asarray(residual, dtype=np.float64) + product).astype(np.float32)


# ------------------------------------------------------------------ a rank cap on the increment, with error feedback
#
# The exact increment costs about K adapters a round (above). ``server.lora_residual_rank`` q sends instead the
# best rank-q part of (increment + E), E the part not sent in earlier rounds (the server keeps it), and keeps
# the rest as the new E: error feedback (Seide et al. 2014; Karimireddy et al. 2019, EF-SGD). Nothing is lost,
# only delayed: after any number of rounds, sum(sent) + E = sum(exact increments), to float rounding. A round is
# no longer exact: the global model W0 + R + s B A lags the exact product average by s E.


def capped_increment(target: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B (out, k), A (k, in), remainder (out, in)) with B, A the float32 factors of ``target``'s best rank-k
    part (Eckart-Young; k = min(``rank``, out, in)) and remainder = ``target`` - B @ A in float64, computed from
    the float32 factors, so that whatever rounding they carry is fed back too.

    The split is balanced (B = U sqrt(S), A = sqrt(S) V^T): both factors of one magnitude, the safest for float32.

    >>> t = np.outer([1.0, 2.0], [3.0, 0.0, 1.0]) + np.outer([0.0, 1e-3], [0.0, 1.0, 0.0])
    >>> b, a, rest = capped_increment(t, 1); b.shape, a.shape, b.dtype.name
    ((2, 1), (1, 3), 'float32')
    >>> bool(np.allclose(b @ a + rest, t)), bool(np.abs(rest).max() < 2e-3)
    (True, True)
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise ValueError(f"the residual's rank cap must be a positive integer, got {rank!r}")
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 2:
        raise ValueError(f"capped_increment needs an (out, in) matrix, got shape {target.shape}")
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    k = min(int(rank), s.size)
    root = np.sqrt(s[:k])
    b = (u[:, :k] * root).astype(np.float32)
    a = (root[:, None] * vt[:k]).astype(np.float32)
    remainder = target - b.astype(np.float64) @ a.astype(np.float64)
    return b, a, remainder
